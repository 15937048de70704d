"""Fixtures shared by this folder's tests."""

from tests.fake_frontend import fake, served, tokenizer  # noqa: F401 (fixtures, registered by importing them here)
