"""Fake cuda-python package for tests (see tests/fakes/README.md)."""
