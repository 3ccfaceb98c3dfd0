"""Network egress rules: what an `egress:` entry means, and the pure decisions about it.

An entry is `TARGET:PORT` with an optional `/PROTOCOL`, tcp (the default) or udp:

    api.example.org:443       a domain: the addresses the daemon's resolver gets for exactly
                              this name, while their DNS TTL lasts
    *.example.org:443         a wildcard: any name strictly below example.org (not
                              example.org itself); only where written
    192.0.2.10:80             an IPv4 address
    198.51.100.0/24:443       an IPv4 network
    ntp.example.org:123/udp   UDP datagrams to that port (relayed by the daemon, flow by flow)

Why this shape, rather than a mapping per rule (`{host: ..., port: ..., protocol: ...}`): a
reviewer reads one line per destination, as in a firewall's allowlist, and a list of strings
diffs and lints line by line. Why no port ranges or "any port" in a policy: every port granted
is a service reached; a ceiling may say `*` (any port) because it bounds, it does not grant.

What is refused at validation, with the reason, because the mechanism could not enforce it
(agentd/sandbox/egress.py): UDP to port 53 (DNS goes to the daemon's resolver whatever the
policy says: a name's answer is what the resolver checks and puts in the set, and a second
resolver would be a way around it) and IPv6 targets (workers get no IPv6 address). A policy
that says one thing and a kernel that enforces another is what deny-by-default forbids. A
protocol is a separate grant: `host:514/udp` does not allow TCP to 514, nor the reverse.

The decisions here (`name_rule`, `address_rule`, `covers`, `special_address`) are shared by
the stage clamp, the resolver and the proxy, so the daemon and `agentctl policy explain`
cannot disagree about what an entry allows.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

RuleKind = Literal["ip", "cidr", "domain", "wildcard"]

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_ENTRY = re.compile(r"^(?P<target>[^/\s]+(?:/\d{1,2})?):(?P<port>\*|\d{1,5})"
                    r"(?:/(?P<protocol>[a-z]+))?$")
DNS_PORT: Final = 53
# A CIDR wider than this is linted (agentd/policy/lint.py): thousands of hosts.
WIDE_PREFIX: Final = 24

# Addresses no public name should resolve to: an answer pointing there is DNS rebinding (a
# name that makes the worker reach the host, the daemon, or the local network), refused
# unless an ip or cidr entry names the address itself.
SPECIAL_NETWORKS: Final[tuple[ipaddress.IPv4Network, ...]] = tuple(
    ipaddress.IPv4Network(n) for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4"))


@dataclass(frozen=True)
class EgressRule:
    """One parsed entry; `text` is its canonical spelling (what policies and records show)."""

    kind: RuleKind
    target: str
    """"192.0.2.10", "198.51.100.0/24", "api.example.org" or "*.example.org"."""
    port: int | None
    """None: any port (ceilings only)."""
    protocol: str = "tcp"

    @property
    def text(self) -> str:
        port = "*" if self.port is None else str(self.port)
        suffix = "" if self.protocol == "tcp" else f"/{self.protocol}"
        return f"{self.target}:{port}{suffix}"

    @property
    def network(self) -> ipaddress.IPv4Network | None:
        """The addresses an ip or cidr entry names; None for names."""
        if self.kind in ("ip", "cidr"):
            return ipaddress.IPv4Network(self.target)
        return None

    def in_words(self) -> str:
        """The entry as a reviewer reads it."""
        port = "any port" if self.port is None else f"port {self.port}"
        what = {"ip": f"the address {self.target}",
                "cidr": f"any of the {self._size()} addresses in {self.target}",
                "domain": f"{self.target} (the addresses the daemon's resolver gets for it,"
                          " while their DNS TTL lasts)",
                "wildcard": f"any name under {self.target.removeprefix('*.')} (not the name"
                            " itself), as resolved by the daemon"}[self.kind]
        return f"{what}, {self.protocol.upper()} {port}"

    def _size(self) -> int:
        network = self.network
        return 0 if network is None else network.num_addresses


def parse_rule(value: Any, *, any_port: bool = False) -> EgressRule:
    """An entry as written; ValueError with what to write instead. `any_port`: `*` is
    accepted as the port (stage ceilings)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an egress entry; write HOST:PORT, e.g."  # noqa: TRY004
                         " api.example.org:443")
    text = value.strip().lower()
    if text.startswith("["):
        raise ValueError(f"{value!r}: IPv6 egress is not supported (workers have no IPv6"
                         " address); name an IPv4 address, network or a domain")
    match = _ENTRY.fullmatch(text)
    if match is None:
        raise ValueError(f"{value!r} is not an egress entry; write HOST:PORT, CIDR:PORT or"
                         " DOMAIN:PORT, e.g. api.example.org:443, 192.0.2.10:80,"
                         " 198.51.100.0/24:443, *.example.org:443")
    protocol = match.group("protocol") or "tcp"
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"{value!r}: unknown protocol {protocol!r}; write /tcp (the default)"
                         " or /udp")
    port_text = match.group("port")
    port: int | None
    if port_text == "*":
        if not any_port:
            raise ValueError(f"{value!r}: a policy names each port it needs (any port, '*',"
                             " is for stage ceilings only)")
        port = None
    else:
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"{value!r}: port {port} is not between 1 and 65535")
        if protocol == "udp" and port == DNS_PORT:
            raise ValueError(f"{value!r}: DNS always goes to the daemon's resolver (it checks"
                             " each name against the policy); a policy cannot grant another"
                             " DNS server; remove it and list the names to resolve instead")
    target = match.group("target").rstrip(".")
    kind: RuleKind
    if ":" in target:
        raise ValueError(f"{value!r}: IPv6 egress is not supported (workers have no IPv6"
                         " address); name an IPv4 address, network or a domain")
    if "/" in target:
        try:
            network = ipaddress.IPv4Network(target, strict=True)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {target} is not an IPv4 network ({exc}); write"
                             " e.g. 198.51.100.0/24") from None
        kind, target = ("ip", str(network.network_address)) if network.prefixlen == 32 \
            else ("cidr", str(network))
    elif re.fullmatch(r"[0-9.]+", target):
        try:
            target = str(ipaddress.IPv4Address(target))
        except ValueError:
            raise ValueError(f"{value!r}: {target} is not an IPv4 address") from None
        kind = "ip"
    else:
        wildcard = target.startswith("*.")
        name = target.removeprefix("*.")
        labels = name.split(".")
        if ("*" in name or len(name) > 253 or len(labels) < 2
                or not all(_LABEL.fullmatch(label) for label in labels)):
            raise ValueError(f"{value!r}: {target} is not a domain name (letters, digits and"
                             " '-' in dot-separated labels, at least two labels; a wildcard"
                             " only as the whole first label, *.example.org)")
        kind = "wildcard" if wildcard else "domain"
    return EgressRule(kind, target, port, protocol)


def canonical_entry(value: Any) -> str:
    """Pydantic validator of a policy's entry: its canonical text."""
    return parse_rule(value).text


def canonical_ceiling_entry(value: Any) -> str:
    """Pydantic validator of a ceiling's entry (`*` ports allowed)."""
    return parse_rule(value, any_port=True).text


def parse_rules(entries: Iterable[str]) -> tuple[EgressRule, ...]:
    """Already validated entries (an EffectivePolicy's), parsed."""
    return tuple(parse_rule(e, any_port=True) for e in entries)


def valid_name(name: str) -> bool:
    """Whether `name` is a host name a policy could name: dot-separated labels of letters,
    digits and '-' (no empty label, none over 63), at least two, at most 253 in all."""
    labels = name.split(".")
    return (len(name) <= 253 and len(labels) >= 2
            and all(_LABEL.fullmatch(label) for label in labels))


def name_matches(rule: EgressRule, name: str) -> bool:
    """Whether a DNS name falls under a domain or wildcard entry (case and a final dot
    ignored); a malformed name ("a..example.org", a label of 64) falls under none."""
    name = name.lower().rstrip(".")
    if not valid_name(name):
        return False
    if rule.kind == "domain":
        return name == rule.target
    if rule.kind == "wildcard":
        return name.endswith(rule.target[1:]) and name != rule.target[2:]
    return False


def name_rule(rules: Iterable[EgressRule], name: str) -> EgressRule | None:
    """The first domain or wildcard entry that allows resolving `name` (for any protocol),
    if any."""
    return next((r for r in rules if name_matches(r, name)), None)


def address_rule(rules: Iterable[EgressRule], address: str, port: int,
                 protocol: str = "tcp") -> EgressRule | None:
    """The first ip or cidr entry that allows `protocol` to `address`:`port`, if any."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return None
    for rule in rules:
        network = rule.network
        if (network is not None and ip in network and rule.port in (None, port)
                and rule.protocol == protocol):
            return rule
    return None


def special_address(address: str) -> bool:
    """Whether `address` is loopback, private, link-local, shared or multicast space (see
    SPECIAL_NETWORKS): a resolved name pointing there is refused as rebinding."""
    ip = ipaddress.IPv4Address(address)
    return any(ip in network for network in SPECIAL_NETWORKS)


def covers(top: EgressRule, entry: EgressRule) -> bool:
    """Whether ceiling entry `top` allows everything policy entry `entry` allows: same
    protocol, its port (or any), and its target within: a domain or wildcard under a
    wildcard, an address or network inside a network. A network never covers a name: what a
    name resolves to is not known when the policy is clamped."""
    if top.protocol != entry.protocol or top.port not in (None, entry.port):
        return False
    if top.kind == "domain":
        return entry.kind == "domain" and entry.target == top.target
    if top.kind == "wildcard":
        if entry.kind == "domain":
            return name_matches(top, entry.target)
        return entry.kind == "wildcard" and (entry.target == top.target
                                             or name_matches(top, entry.target[2:]))
    outer, inner = top.network, entry.network
    return outer is not None and inner is not None and inner.subnet_of(outer)


# -- secrets ---------------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
# Headers that frame or route the request: a secret in one would change where or how much is
# sent, not who is asking.
_FRAMING_HEADERS: Final = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
    "expect", "keep-alive", "proxy-connection", "proxy-authorization"})


@dataclass(frozen=True)
class SecretRule:
    """A secret the egress proxy sends as an HTTP header to named domains (over TLS it ends).

    The value is never in the policy: `name` is a file in the daemon's credentials directory.
    """

    name: str
    header: str
    format: str
    """How the header's value is made: `{secret}` stands for the file's content."""
    domains: tuple[str, ...]
    """Names ("api.example.org") or wildcards ("*.example.org") it is sent to."""

    def applies_to(self, name: str) -> bool:
        """Whether requests to `name` get this secret."""
        return any(name_matches(EgressRule("wildcard" if d.startswith("*.") else "domain",
                                           d, None), name) for d in self.domains)

    def value(self, secret: str) -> str:
        return self.format.replace("{secret}", secret)

    def to_text(self) -> str:
        """Canonical JSON: how an EffectivePolicy holds it (hashed, stored, compared)."""
        return json.dumps({"name": self.name, "header": self.header, "format": self.format,
                           "domains": list(self.domains)}, sort_keys=True,
                          separators=(",", ":"))

    def in_words(self) -> str:
        return (f"the daemon's secret {self.name!r} as the {self.header} header of every HTTPS"
                f" request to {', '.join(self.domains)} (TLS ends at the daemon's proxy; the"
                " worker never sees the value)")


def parse_secret(value: Any) -> SecretRule:
    """A `network.secrets` entry as written (a mapping); ValueError with what to write."""
    example = ("write {name: example-token, header: Authorization, format: 'Bearer {secret}',"
               " domains: [api.example.org]}")
    if not isinstance(value, dict):
        raise ValueError(f"{value!r} is not a secret; {example}")  # noqa: TRY004
    unknown = set(value) - {"name", "header", "format", "domains"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))} in a secret;"
                         f" {example}")
    name, header = value.get("name"), value.get("header")
    text_format, domains = value.get("format", "{secret}"), value.get("domains")
    if not isinstance(name, str) or not _SECRET_NAME.fullmatch(name):
        raise ValueError(f"secret name {name!r} must be a file name in the daemon's credentials"
                         " directory: letters, digits, '.', '_' and '-', at most 64")
    if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
        raise ValueError(f"secret {name}: header {header!r} is not an HTTP header name;"
                         " write e.g. Authorization")
    if header.lower() in _FRAMING_HEADERS:
        raise ValueError(f"secret {name}: {header} frames or routes the request; a secret goes"
                         " in a header such as Authorization or X-Api-Key")
    if (not isinstance(text_format, str) or text_format.count("{secret}") != 1
            or not header_value_ok(text_format) or len(text_format) > 256):
        raise ValueError(f"secret {name}: format {text_format!r} must hold {{secret}} exactly"
                         " once, in visible ASCII with inner spaces only, e.g."
                         " 'Bearer {secret}'")
    if not isinstance(domains, (list, tuple)) or not domains:
        raise ValueError(f"secret {name}: domains must list the names it is sent to, e.g."
                         " [api.example.org]")
    canonical = []
    for domain in domains:
        rule = parse_rule(f"{domain}:443") if isinstance(domain, str) else None
        if rule is None or rule.kind not in ("domain", "wildcard"):
            raise ValueError(f"secret {name}: {domain!r} is not a domain name or *.domain;"
                             " a secret is sent by name, never to an address")
        canonical.append(rule.target)
    return SecretRule(name, header, text_format, tuple(dict.fromkeys(canonical)))


def header_value_ok(value: str) -> bool:
    """Whether `value` is an HTTP field value the proxy sends as is: visible ASCII and inner
    spaces (no tab, control character, DEL or non-ASCII, nothing leading or trailing). A
    value h11 refused would end up in an error message: for a secret, a leak."""
    return (bool(value) and value == value.strip(" ")
            and all(32 <= ord(c) < 127 for c in value))


def secret_from_text(text: str) -> SecretRule:
    """The inverse of SecretRule.to_text."""
    data = json.loads(text)
    return SecretRule(data["name"], data["header"], data["format"], tuple(data["domains"]))


def uncovered_domains(secret: SecretRule, rules: Iterable[EgressRule]) -> list[str]:
    """The secret's domains no domain or wildcard egress entry reaches: sending a secret
    somewhere needs the connection to be granted first."""
    rules = list(rules)
    missing = []
    for domain in secret.domains:
        probe = EgressRule("wildcard" if domain.startswith("*.") else "domain", domain, None)
        if not any((r.kind == "domain" and probe.kind == "domain" and r.target == domain)
                   or (r.kind == "wildcard" and covers(
                       EgressRule(r.kind, r.target, None), probe))
                   for r in rules):
            missing.append(domain)
    return missing
