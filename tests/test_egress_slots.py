"""Egress slots against the real kernel, without a daemon: what a slot is made of (pyroute2,
in the slot maker process, agentd/sandbox/slotmaker.py), that a worker's packet gets from it
into the egress namespace, the nft set elements a task is given and deletes, and that a slot
that cannot be made leaves nothing open. The daemon's side of egress is tests/test_egress.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from agentd.sandbox import libc
from agentd.sandbox.egress import RESOLVER, EgressNetwork, Slot, SlotPool

T = TypeVar("T")


@pytest.fixture
def network() -> Iterator[EgressNetwork]:
    net = EgressNetwork()
    net.start()
    net.start_maker()
    yield net
    net.close()


def _in(fd: int, fn: Callable[[], T]) -> T:
    """`fn` run by a thread that joined the network namespace `fd` (and then ends)."""
    result: list[Any] = []

    def run() -> None:
        try:
            libc.setns(fd, libc.CLONE_NEWNET)
            result.append(fn())
        except BaseException as exc:  # raised below
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[no-any-return]


def _ip(fd: int, *args: str) -> Any:
    """iproute2's JSON view of the namespace `fd`: a second opinion on what netlink made."""
    out = subprocess.run(["nsenter", f"--net=/proc/{os.getpid()}/fd/{fd}", "ip", "-j", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _links(fd: int) -> dict[str, Any]:
    return {link["ifname"]: link for link in _ip(fd, "addr", "show")}


def _elements(network: EgressNetwork, slot: Slot) -> list[str]:
    return [line for line in network.list_allowed().replace(",", "\n").splitlines()
            if slot.address + " . " in line]


class TestSlot:
    def test_slot_links_addresses_and_route(self, network: EgressNetwork) -> None:
        slot = network.make_slot()
        try:
            inside = _links(slot.fd)
            assert set(inside) == {"lo", "eth0"}
            assert "UP" in inside["lo"]["flags"]
            assert "UP" in inside["eth0"]["flags"]
            assert [(a["family"], a["local"], a["prefixlen"]) for a in
                    inside["eth0"]["addr_info"]] == [("inet", slot.address, 30)]
            routes = _ip(slot.fd, "route", "show", "default")
            assert [(r["gateway"], r["dev"]) for r in routes] == [(slot.gateway, "eth0")]
            assert _in(slot.fd, lambda: _read("/proc/sys/net/ipv6/conf/eth0/disable_ipv6")) == "1"
            assert network.ns is not None
            assert network.ns.fd is not None
            outside = _links(network.ns.fd)[slot.link]
            assert "UP" in outside["flags"]
            assert [(a["local"], a["prefixlen"]) for a in outside["addr_info"]] == [
                (slot.gateway, 30)]
        finally:
            network.release(slot)

    def test_a_packet_from_the_slot_reaches_the_egress_namespace(
            self, network: EgressNetwork) -> None:
        assert network.ns is not None
        listener = network.ns.call(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        slot = network.make_slot()
        try:
            listener.bind((RESOLVER, 53))
            listener.settimeout(10)

            def send() -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(b"hello", (RESOLVER, 53))

            _in(slot.fd, send)
            data, source = listener.recvfrom(64)
            assert (data, source[0]) == (b"hello", slot.address)
        finally:
            listener.close()
            network.release(slot)

    def test_a_link_left_from_the_last_turn_is_replaced(self, network: EgressNetwork) -> None:
        old = network.make_slot()
        network._next = old.index  # the /16 has turned over while `old` still exists
        new = network.make_slot()
        try:
            assert (new.index, new.address, new.link) == (old.index, old.address, old.link)
            assert "eth0" not in _links(old.fd)  # its pair went with the link
            assert "eth0" in _links(new.fd)
        finally:
            network.release(new)
            network.release(old)

    def test_a_slot_that_cannot_be_made_leaves_no_fd(self, network: EgressNetwork) -> None:
        """The maker's error comes back as OSError, with no fd on either side: the daemon's
        fds are as before, and the maker holds none but its own."""
        network.release(network.make_slot())  # the first one's threads and sockets
        before = set(os.listdir("/proc/self/fd"))
        maker = network._maker
        assert maker is not None
        held = set(os.listdir(f"/proc/{maker._process.pid}/fd"))
        with pytest.raises(OSError, match="could not make slot"):
            maker.make(7, "ae-test", "not-an-address", "100.127.0.29")
        assert set(os.listdir("/proc/self/fd")) == before
        assert set(os.listdir(f"/proc/{maker._process.pid}/fd")) <= held  # none kept
        assert network.ns is not None
        assert network.ns.fd is not None
        # The kernel takes a namespace apart in its own time (a workqueue): polled, bounded.
        deadline = time.monotonic() + 10
        while "ae-test" in _links(network.ns.fd) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "ae-test" not in _links(network.ns.fd)  # the pair went with its namespace


    def test_a_maker_killed_is_replaced(self, network: EgressNetwork) -> None:
        """SIGKILL of the slot maker costs no slot: the next one is made by a new maker."""
        maker = network._maker
        assert maker is not None
        os.kill(maker.pid, signal.SIGKILL)
        maker._process.wait(timeout=10)
        slot = network.make_slot()
        try:
            assert "eth0" in _links(slot.fd)
            assert network._maker is not None
            assert network._maker.pid != maker.pid
        finally:
            network.release(slot)


class TestElements:
    def test_allow_all_is_one_transaction_and_release_deletes_them(
            self, network: EgressNetwork, monkeypatch: pytest.MonkeyPatch) -> None:
        slot = network.make_slot()
        other = network.make_slot()
        commands: list[str] = []
        run = network._run

        def counted(command: str) -> str:
            commands.append(command)
            return run(command)

        monkeypatch.setattr(network, "_run", counted)
        network.allow_all(slot, [])
        assert commands == []  # nothing to add: no nft at all
        network.allow_all(slot, [("198.51.100.0/24", 443, None), ("203.0.113.7", 8080, 60),
                                 ("198.51.100.0/24", 443, None)])
        network.allow(other, "203.0.113.7", 8080, None)
        assert len(commands) == 2
        assert len(slot.elements) == 2
        assert len(_elements(network, slot)) == 2
        commands.clear()
        network.release(slot)
        assert len(commands) == 1
        assert _elements(network, slot) == []
        assert len(_elements(network, other)) == 1  # another task's are not touched
        network.release(other)

    def test_release_deletes_the_rest_when_one_is_gone(self, network: EgressNetwork) -> None:
        slot = network.make_slot()
        network.allow_all(slot, [("198.51.100.1", 443, None), ("198.51.100.2", 443, 1)])
        # the second one's timeout passes (what nft does then, done now)
        network._run("delete element inet agentd_egress allowed "
                     f"{{ {slot.address} . 198.51.100.2 . 443 }}")
        network.release(slot)
        assert _elements(network, slot) == []
        assert slot.elements == []
        assert slot.fd == -1


class TestPool:
    def test_take_ready_never_makes_one(self, network: EgressNetwork) -> None:
        empty = SlotPool(network, depth=0)
        try:
            assert empty.take_ready() is None
            made = empty.take()  # made by the caller
            network.release(made)
        finally:
            empty.close()
        pool = SlotPool(network, depth=1)
        try:
            deadline = time.monotonic() + 30  # made by the pool's thread, not timed
            while (ready := pool.take_ready()) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert ready is not None
            assert ready.fd >= 0
            network.release(ready)
        finally:
            pool.close()
