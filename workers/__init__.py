"""Typed workers: one per task queue, and the process that runs them."""
