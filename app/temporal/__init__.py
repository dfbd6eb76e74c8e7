"""Temporal plumbing: the client factory, the embedded dev server, the
project's search attributes and the words for how a workflow closed."""
