"""``fastsampler.reference``: the public name of the numpy reference, `fastsampler.backends.reference` itself.

Importing this module puts the reference under both names (one module object, not a copy), so ``import
fastsampler.reference``, ``from fastsampler import reference`` and ``fastsampler.reference`` all give it.
"""

import sys

from .backends import reference as _reference

sys.modules[__name__] = _reference
