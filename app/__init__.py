"""flow-nexus: a self-hosted Flow Nexus platform on Temporal."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flow-nexus")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
