"""Integrations with other libraries, each in its own module, imported only when asked for by name:

- `fastsampler.integrations.transformers`: Hugging Face ``model.generate`` with every token drawn by fastsampler.

Importing this package imports none of them (nor torch).
"""
