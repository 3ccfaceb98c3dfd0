"""Egress in policies: entries parsed and refused with their reason, clamped by the stage
ceilings, and shown by explain, diff and lint (agentd/policy/egress.py)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from agentd.policy import effective_policy, load_policy, load_stage_ceilings
from agentd.policy.diff import diff
from agentd.policy.egress import (
    address_rule,
    covers,
    name_rule,
    parse_rule,
    special_address,
)
from agentd.policy.explain import explain
from agentd.policy.issues import PolicyFileError
from agentd.policy.lint import lint

REPO = Path(__file__).resolve().parent.parent
CEILING = """\
    network:
      egress:
        - "*.example.org:*"
        - 192.0.0.0/16:*
        - 198.51.100.0/24:443
      limits: {bytes: 8MiB, connections_per_second: 100}
"""


def _stages(tmp_path: Path) -> Path:
    """policies/stages.yaml with egress allowed at sandbox (the shipped one allows none)."""
    text = (REPO / "policies" / "stages.yaml").read_text()
    start = text.index("  sandbox:")
    at = text.index("    network: none\n", start)
    path = tmp_path / "stages.yaml"
    path.write_text(text[:at] + textwrap.indent(textwrap.dedent(CEILING), "    ")
                    + text[at + len("    network: none\n"):])
    return path


def _policy(tmp_path: Path, egress: str, limits: str = "") -> Path:
    path = tmp_path / "fetcher.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: agentd/v1
        kind: Policy
        name: fetcher
        stages:
          prototype:
            exec: {allow: [/usr/bin/python3]}
          sandbox:
            network:
              egress: [%s]
        %s""") % (egress, limits))
    return path


class TestEntries:
    @pytest.mark.parametrize(("text", "kind", "canonical"), [
        ("API.Example.org:443", "domain", "api.example.org:443"),
        ("*.example.org:443", "wildcard", "*.example.org:443"),
        ("192.0.2.10:80", "ip", "192.0.2.10:80"),
        ("192.0.2.10/32:80/tcp", "ip", "192.0.2.10:80"),
        ("198.51.100.0/24:443", "cidr", "198.51.100.0/24:443"),
        ("NTP.example.org:123/UDP", "domain", "ntp.example.org:123/udp"),
        ("192.0.2.10:514/udp", "ip", "192.0.2.10:514/udp"),
        ("*.example.org:4433/udp", "wildcard", "*.example.org:4433/udp"),
        ("198.51.100.0/24:443/udp", "cidr", "198.51.100.0/24:443/udp"),
    ])
    def test_forms(self, text: str, kind: str, canonical: str) -> None:
        """Each form parses to its kind and one canonical spelling."""
        rule = parse_rule(text)
        assert (rule.kind, rule.text) == (kind, canonical)

    @pytest.mark.parametrize(("text", "reason"), [
        ("api.example.org", "not an egress entry"),
        ("api.example.org:53/udp", "DNS always goes to the daemon's resolver"),
        ("192.0.2.53:53/udp", "DNS always goes to the daemon's resolver"),
        ("[2001:db8::1]:443", "IPv6 egress is not supported"),
        ("api.example.org:*", "stage ceilings only"),
        ("10.0.0.1/8:443", "host bits set"),
        ("*.org:443", "not a domain name"),
        ("a.*.example.org:443", "not a domain name"),
        ("example.org:70000", "not between 1 and 65535"),
        ("example.org:22/sctp", "unknown protocol"),
    ])
    def test_refused_with_reason(self, text: str, reason: str) -> None:
        """What the mechanism cannot enforce, or is not an entry, is refused saying why."""
        with pytest.raises(ValueError, match=reason):
            parse_rule(text)

    def test_matching(self) -> None:
        """A wildcard matches names strictly below it; address entries match by network and
        port; special addresses are recognised."""
        rules = [parse_rule(e) for e in ("*.example.org:443", "api.test.org:80",
                                         "198.51.100.0/24:443")]
        assert name_rule(rules, "a.b.example.org.") is rules[0]
        assert name_rule(rules, "example.org") is None
        assert name_rule(rules, "API.test.org") is rules[1]
        assert name_rule(rules, "x.test.org") is None
        assert address_rule(rules, "198.51.100.7", 443) is rules[2]
        assert address_rule(rules, "198.51.100.7", 80) is None
        assert address_rule(rules, "198.51.101.7", 443) is None
        assert address_rule(rules, "198.51.100.7", 443, "udp") is None  # a protocol is a grant
        udp = [parse_rule("198.51.100.0/24:443/udp"), *rules]
        assert address_rule(udp, "198.51.100.7", 443, "udp") is udp[0]
        assert address_rule(udp, "198.51.100.7", 443) is udp[3]
        assert special_address("127.0.0.1")
        assert special_address("10.1.2.3")
        assert not special_address("198.51.100.7")

    def test_covers(self) -> None:
        """A ceiling entry covers names under its wildcard and networks inside its network,
        never a name by an address."""
        top = parse_rule("*.example.org:*", any_port=True)
        assert covers(top, parse_rule("api.example.org:443"))
        assert covers(top, parse_rule("*.cdn.example.org:443"))
        assert not covers(top, parse_rule("example.org:443"))
        net = parse_rule("192.0.2.0/24:443")
        assert covers(net, parse_rule("192.0.2.9:443"))
        assert not covers(net, parse_rule("192.0.2.9:80"))
        assert not covers(net, parse_rule("192.0.0.0/16:443"))
        assert not covers(parse_rule("0.0.0.0/0:*", any_port=True), parse_rule("a.org:443"))
        # a protocol is part of what is covered: a TCP ceiling does not open UDP
        assert not covers(top, parse_rule("api.example.org:123/udp"))
        assert covers(parse_rule("*.example.org:*/udp", any_port=True),
                      parse_rule("ntp.example.org:123/udp"))


class TestPolicy:
    def test_default_and_shipped_ceiling_are_none(self, tmp_path: Path) -> None:
        """Without a ceiling that lists egress (the shipped one), egress is clamped to none,
        with a note naming the ceiling's line."""
        policy = load_policy(_policy(tmp_path, "api.example.org:443"))
        ceilings = load_stage_ceilings(REPO / "policies" / "stages.yaml")
        assert effective_policy(policy, "prototype", ceilings).network == "none"
        sandbox = effective_policy(policy, "sandbox", ceilings)
        assert (sandbox.network, sandbox.egress) == ("none", ())
        assert any("network: egress lowered to none" in n for n in sandbox.notes)

    def test_clamped_by_ceiling(self, tmp_path: Path) -> None:
        """Entries the ceiling does not cover are dropped, limits lowered, each with a note."""
        path = _policy(tmp_path, "api.example.org:443, other.net:443, 198.51.100.7:443,"
                                 " 198.51.100.7:80",
                       "      limits: {bytes: 1GiB, connections_per_second: 5}\n")
        eff = effective_policy(load_policy(path), "sandbox", load_stage_ceilings(
            _stages(tmp_path)))
        assert eff.network == "egress"
        assert eff.egress == ("api.example.org:443", "198.51.100.7:443")
        assert (eff.egress_bytes, eff.egress_connections_per_second) == (8 << 20, 5)
        notes = "\n".join(eff.notes)
        assert "other.net:443 dropped" in notes
        assert "198.51.100.7:80 dropped" in notes
        assert "network.limits.bytes: 1GiB lowered to 8MiB" in notes

    def test_hash_unchanged_without_egress(self, tmp_path: Path) -> None:
        """A policy without egress hashes as before egress existed; egress changes it."""
        path = _policy(tmp_path, "api.example.org:443")
        policy, stages = load_policy(path), load_stage_ceilings(_stages(tmp_path))
        none = effective_policy(policy, "prototype", stages)
        assert "egress" not in none.hashed_fields()
        with_egress = effective_policy(policy, "sandbox", stages)
        assert with_egress.hashed_fields()["egress"] == ["api.example.org:443"]
        assert type(none).from_json(with_egress.to_json()) == with_egress

    def test_error_names_line_and_field(self, tmp_path: Path) -> None:
        """A bad entry is reported at its line, under its field."""
        with pytest.raises(PolicyFileError) as caught:
            load_policy(_policy(tmp_path, "ok.example.org:443, 'x.org:53/udp'"))
        assert caught.value.line == 9
        assert caught.value.field == "stages.sandbox.network.egress[1]"


class TestReview:
    def test_explain_diff_lint(self, tmp_path: Path) -> None:
        """explain says where it may connect; diff shows an entry moving; lint flags a
        wildcard and a wide network."""
        stages_path = _stages(tmp_path)
        stages = load_stage_ceilings(stages_path)
        old = _policy(tmp_path, "api.example.org:443")
        eff_old = effective_policy(load_policy(old), "sandbox", stages)
        text = "\n".join(explain(eff_old))
        assert "api.example.org (the addresses the daemon's resolver gets" in text
        assert "everything else is refused" in text
        new_dir = tmp_path / "new"
        new_dir.mkdir()
        shutil.copy(stages_path, new_dir / "stages.yaml")
        new = _policy(new_dir, "'*.cdn.example.org:443', 192.0.2.0/23:443")
        eff_new = effective_policy(load_policy(new), "sandbox", stages)
        lines = [c.line() for c in diff(eff_old, eff_new)]
        assert "  - network.egress: no longer may connect to api.example.org:443" in lines
        assert "  + network.egress: may connect to *.cdn.example.org:443" in lines
        found = {(f.rule, f.line) for f in lint(load_policy(new), stages)}
        assert ("egress-wildcard", 9) in found
        assert ("egress-wide-cidr", 9) in found
        narrow = _policy(new_dir, "192.0.2.0/24:443")
        assert not {f.rule for f in lint(load_policy(narrow), stages)} & {
            "egress-wildcard", "egress-wide-cidr"}
