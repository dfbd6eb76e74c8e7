"""Step types that join capabilities: each runs a capability through its tools."""
