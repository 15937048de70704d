"""Fixtures shared by this folder's tests."""

from tests.kernel_fixtures import seed  # noqa: F401 (a fixture, registered by importing it here)
