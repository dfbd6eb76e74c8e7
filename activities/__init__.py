"""Activities: thin adapters from a contract to an `app/` service."""
