"""Shared pytest setup for the fast tier."""

import warnings

# When a Hypothesis test fails, Hypothesis's pytest plugin imports libcst to print a
# patch with the failing example. libcst 1.0 uses mypy_extensions.TypedDict, which raises
# a DeprecationWarning on import, and with `filterwarnings = ["error"]` (pyproject.toml)
# that warning turns the failure report into an INTERNALERROR that ends the whole session.
# Importing libcst once here, with that one warning silenced, keeps failures reportable.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="mypy_extensions.TypedDict is deprecated",
                            category=DeprecationWarning)
    try:
        import libcst  # noqa: F401
    except ImportError:
        pass

# Hypothesis's default 200 ms deadline per example fails tests on a loaded 2-core machine
# for no fault of the code; the examples are bounded by max_examples instead.
from hypothesis import settings

settings.register_profile("bitdet", deadline=None)
settings.load_profile("bitdet")
