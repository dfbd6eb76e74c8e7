"""Deterministic workflow definitions: no I/O, clock or randomness outside
`workflow.*`."""
