"""Fake ``cuda.bindings`` for tests."""
