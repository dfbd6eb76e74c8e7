"""Sandboxes: backends (local folders under bubblewrap, E2B), sealed secrets,
and the service API that drives `SandboxSessionWorkflow`."""
