"""Domain services behind the tools: health, audit and the capabilities."""
