"""The worker's network: a new network namespace with only the loopback interface up.

Nothing leaves the namespace: no veth, no route, so `network: none` holds by construction
rather than by filtering. Netlink is spoken through pyroute2 (the maintained library for it);
the module is imported by the launcher once, so the child pays only for one netlink request.
"""

from __future__ import annotations

from pyroute2 import IPRoute


def enter() -> None:
    """Brings up `lo` inside the worker's (already new) network namespace (child side)."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=index, state="up")
