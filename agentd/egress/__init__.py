"""Network egress, the daemon's side: resolver, proxy and records (docs/architecture.md,
"Network egress"). The kernel's side is agentd/sandbox/egress.py."""

from agentd.egress.service import EgressConfig, EgressService, egress_environment
from agentd.egress.task import TaskEgress

__all__ = ["EgressConfig", "EgressService", "TaskEgress", "egress_environment"]
