"""The pieces of the HTTPS egress path that need no daemon: reading a ClientHello's name, the
per-run CA's name constraints (checked by OpenSSL itself), reading credentials, and what a
policy's secrets become after the stage ceiling and in review."""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

import pytest

from agentd.egress.secrets import SecretUnavailable, headers_for, load
from agentd.egress.tls import NotTls, RunAuthority, client_hello_name
from agentd.policy import effective_policy, load_policy, load_stage_ceilings
from agentd.policy.diff import diff
from agentd.policy.egress import SecretRule, parse_secret, secret_from_text
from agentd.policy.explain import explain
from tests.conftest import REPO


def _hello(name: str | None) -> bytes:
    """A real ClientHello from OpenSSL, for `name` (None: no SNI)."""
    context = ssl.create_default_context()
    if name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


class TestClientHello:
    def test_name_read_whole_split_and_partial(self) -> None:
        hello = _hello("api.example.org")
        assert client_hello_name(hello) == "api.example.org"
        assert client_hello_name(_hello(None)) == ""
        assert client_hello_name(hello[:40]) is None  # more bytes needed
        # The same handshake in two records (as a client may send it): still read.
        body = hello[5:]
        cut = len(body) // 2
        split = (b"\x16\x03\x01" + cut.to_bytes(2, "big") + body[:cut]
                 + b"\x16\x03\x01" + (len(body) - cut).to_bytes(2, "big") + body[cut:])
        assert client_hello_name(split) == "api.example.org"
        assert client_hello_name(split[:len(split) - 3]) is None

    def test_not_tls(self) -> None:
        for data in (b"GET / HTTP/1.1\r\n", b"SSH-2.0-OpenSSH\r\n",
                     b"\x16\x03\x01\x00\x05\x02abcd"):
            with pytest.raises(NotTls):
                client_hello_name(data)


class TestRunAuthority:
    def _handshake(self, authority: RunAuthority, name: str, cafile: Path) -> None:
        client_context = ssl.create_default_context(cafile=str(cafile))
        c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context.wrap_bio(c_in, c_out, server_hostname=name)
        # Shuttle bytes between the two ends until the client is done or refuses.
        server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = authority.context_for(name).wrap_bio(server_in, server_out, server_side=True)
        for _ in range(10):
            try:
                client.do_handshake()
                return
            except ssl.SSLWantReadError:
                pass
            server_in.write(c_out.read())
            with contextlib.suppress(ssl.SSLError):  # want-read, or the client's alert
                server.do_handshake()
            c_in.write(server_out.read())
        raise AssertionError("no handshake")

    def test_only_the_secret_names_verify(self, tmp_path: Path) -> None:
        """A leaf for a name outside the CA's name constraints fails OpenSSL's verification,
        even though the CA itself signed it."""
        authority = RunAuthority("r-test", ("api.example.org", "*.svc.example.net"))
        cafile = tmp_path / "ca.pem"
        cafile.write_bytes(authority.pem())
        self._handshake(authority, "api.example.org", cafile)
        self._handshake(authority, "a.svc.example.net", cafile)
        with pytest.raises(ssl.SSLCertVerificationError):
            self._handshake(authority, "bank.example.com", cafile)


class TestCredentials:
    RULE = SecretRule("token", "Authorization", "Bearer {secret}", ("api.example.org",))

    def _write(self, directory: Path, text: str, mode: int = 0o600) -> None:
        path = directory / "token"
        path.write_text(text)
        path.chmod(mode)

    def test_loaded_and_applied(self, tmp_path: Path) -> None:
        self._write(tmp_path, "abc123\n")
        (loaded,) = load(tmp_path, [self.RULE.to_text()])
        assert "abc123" not in repr(loaded)
        assert headers_for([loaded], "api.example.org") == [("Authorization", "Bearer abc123")]
        assert headers_for([loaded], "other.example.org") == []

    @pytest.mark.parametrize(("text", "mode", "why"), [
        (None, 0o600, "cannot be read"),
        ("abc", 0o604, "may be read by any user"),
        ("two\nlines", 0o600, "one line"),
        ("", 0o600, "one line"),
        ("x" * 9000, 0o600, "one line"),
        ("abc \n", 0o600, "no space or tab at either end"),  # copy-paste leaves one
        ("a\tb", 0o600, "visible ASCII"),
        ("caf\u00e9", 0o600, "visible ASCII"),
    ])
    def test_refused(self, tmp_path: Path, text: str | None, mode: int, why: str) -> None:
        if text is not None:
            self._write(tmp_path, text, mode)
        with pytest.raises(SecretUnavailable, match=why):
            load(tmp_path, [self.RULE.to_text()])

    def test_symlink_not_followed(self, tmp_path: Path) -> None:
        target = tmp_path / "elsewhere"
        target.write_text("abc")
        target.chmod(0o600)
        os.symlink(target, tmp_path / "token")
        with pytest.raises(SecretUnavailable, match="cannot be read"):
            load(tmp_path, [self.RULE.to_text()])


POLICY = """\
apiVersion: agentd/v1
kind: Policy
name: caller
stages:
  prototype:
    network:
      egress: [api.example.org:443, other.example.org:443]
      secrets:
        - {name: token, header: Authorization, format: "Bearer {secret}",
           domains: [api.example.org]}
        - {name: other, header: X-Api-Key, domains: [other.example.org]}
"""
CEILING = """\
    network:
      egress: ["*.example.org:443"]
      secrets: {token: [api.example.org]}
"""


def _stages(path: Path, ceiling: str) -> Path:
    """The shipped stages file with `ceiling` as prototype's network."""
    text = (REPO / "policies" / "stages.yaml").read_text()
    at = text.index("    network: none\n")  # prototype's
    path.write_text(text[:at] + ceiling + text[at + len("    network: none\n"):])
    return path


class TestPolicySecrets:
    def test_ceiling_keeps_named_secrets_only(self, tmp_path: Path) -> None:
        (tmp_path / "caller.yaml").write_text(POLICY)
        policy = load_policy(tmp_path / "caller.yaml")
        ceilings = load_stage_ceilings(_stages(tmp_path / "stages.yaml", CEILING))
        effective = effective_policy(policy, "prototype", ceilings)
        kept = [secret_from_text(t) for t in effective.egress_secrets]
        assert [s.name for s in kept] == ["token"]
        assert any("network.secrets: other dropped" in n for n in effective.notes)
        words = "\n".join(explain(effective))
        assert "secret 'token' as the Authorization header" in words
        before = effective_policy(policy, "prototype", load_stage_ceilings(_stages(
            tmp_path / "s2.yaml", CEILING.replace("      secrets: {token: [api.example.org]}\n",
                                                  ""))))
        assert before.egress_secrets == ()
        assert "egress_secrets" not in before.hashed_fields()
        changes = [c.text for c in diff(before, effective)]
        assert any("secret 'token'" in c for c in changes), changes

    def test_ceiling_bounds_where_a_secret_goes(self, tmp_path: Path) -> None:
        """A ceiling's wildcard egress does not let a policy send a secret to any name under
        it: the ceiling lists, per secret, the names it may go to."""
        (tmp_path / "caller.yaml").write_text(POLICY.replace(
            "domains: [api.example.org]}", "domains: [api.example.org, other.example.org]}"))
        policy = load_policy(tmp_path / "caller.yaml")
        ceilings = load_stage_ceilings(_stages(tmp_path / "stages.yaml", CEILING))
        effective = effective_policy(policy, "prototype", ceilings)
        (kept,) = [secret_from_text(t) for t in effective.egress_secrets]
        assert kept.domains == ("api.example.org",)
        assert any("network.secrets: token for other.example.org dropped" in n
                   for n in effective.notes), effective.notes

    def test_format_must_be_a_plain_header_value(self) -> None:
        for bad in ("Bearer {secret} ", "Bearer\t{secret}", "{secret}\x7f"):
            with pytest.raises(ValueError, match="visible ASCII"):
                parse_secret({"name": "t", "header": "X", "format": bad,
                              "domains": ["a.example.org"]})

    def test_framing_header_refused(self) -> None:
        with pytest.raises(ValueError, match="frames or routes"):
            parse_secret({"name": "t", "header": "Host", "domains": ["a.example.org"]})



def test_only_outermost_literal_entries_go_to_the_set() -> None:
    """An address or network inside another entry on the same port is not added again: nft's
    interval set refuses an overlapping element, which failed the task's start."""
    from agentd.egress.service import _outermost
    from agentd.policy.egress import parse_rules

    rules = parse_rules(["198.18.0.10:8080", "198.18.0.0/24:8080", "198.18.0.10:81",
                         "api.example.org:443", "10.1.0.0/16:80", "10.0.0.0/8:80"])
    assert [r.text for r in _outermost(rules)] == [
        "198.18.0.0/24:8080", "198.18.0.10:81", "10.0.0.0/8:80"]
