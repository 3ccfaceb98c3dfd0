"""agentd: confined, policy-bound, audited tool calls for AI agents."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agentd")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
