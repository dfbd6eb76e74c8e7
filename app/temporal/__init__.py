"""Temporal plumbing: the client factory, the embedded dev server and the
project's search attributes."""
