"""Fixtures for the fault tests; shared helpers live in faultkit.py (a module name unique in the suite)."""

from faultkit import tiny_train  # noqa: F401  (a fixture: pytest finds it through this conftest)
