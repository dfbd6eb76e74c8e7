"""Pydantic models that cross a Temporal boundary.

Workflows import these inside the workflow sandbox, so modules here import
only pydantic and the standard library.
"""
