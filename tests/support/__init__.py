"""Shared test helpers: real servers started by the test setup."""
