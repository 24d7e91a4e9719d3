"""fastsampler's tests: a package, so that shared helpers import as `tests.backend_checks` and `tests.strategies`."""
