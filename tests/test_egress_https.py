"""The HTTPS side of egress against a real daemon and a fake internet (tests/fake_internet.py).

Names on one shared address (a CDN: cdn-a.test allowed, cdn-b.test not) are told apart by
the TLS server name and the Host header, on the transparent path and through the HTTPS proxy
(CONNECT, the worker's https_proxy). A secret the policy names is added by the proxy to every
request to its domain, read from the daemon's credentials directory: the destination sees it;
the worker's environment, files and output and the audit log never hold it, and a destination
whose certificate is not trusted never gets it. One worker script does every check of the
daemon (one step); each refusal is checked on record.
"""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from tests.conftest import (
    CONFIG,
    DaemonHandle,
    daemon_base,
    execute,
    start_daemon,
    stop_daemon,
    write_daemon_dir,
)
from tests.fake_internet import Internet, TestCA
from tests.test_egress import _records

SECRET_HOST, CDN, UNTRUSTED, DNS = "198.18.1.20", "198.18.1.21", "198.18.1.22", "198.18.1.53"
SECRET = "s3cr3t-" + os.urandom(12).hex()
ZONE = {"secret.test": (SECRET_HOST, 300), "cdn-a.test": (CDN, 300),
        "cdn-b.test": (CDN, 300), "untrusted.test": (UNTRUSTED, 300)}
POLICY = """\
apiVersion: agentd/v1
kind: Policy
name: caller
stages:
  prototype:
    exec: {allow: [/usr/bin/, /bin/]}
    filesystem: {read_only: [/usr, /bin, /lib, /lib64]}
    network:
      egress: [secret.test:8443, cdn-a.test:8443, cdn-a.test:8080, untrusted.test:8443]
      secrets:
        - name: api-token
          header: Authorization
          format: "Bearer {secret}"
          domains: [secret.test, untrusted.test]
      limits: {connections_per_second: 200}  # one script makes ~25 at once
    limits: {wall_time: 60s, output: 4MiB}
"""
CEILING = """\
    network:
      egress: ["secret.test:*", "cdn-a.test:*", "untrusted.test:*"]
      secrets: {api-token: [secret.test, untrusted.test]}
      limits: {connections_per_second: 200}
"""


class _Recorder(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


def _serve(internet: Internet, address: str, port: int, seen: list[dict[str, str]],
           context: ssl.SSLContext | None) -> _Recorder:
    """A server that notes every request's headers and answers without echoing them."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"host": self.headers.get("Host", ""), "path": self.path,
                         "authorization": self.headers.get("Authorization", ""),
                         "server": f"{address}:{port}"})
            body = f"page {self.path} of {self.headers.get('Host')}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    def make() -> _Recorder:
        server = _Recorder((address, port), Handler)
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        return server

    server = internet.ns.call(make)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("https")
    internet = Internet(f"agentd-https-{os.getpid()}", addresses=(SECRET_HOST, CDN, UNTRUSTED),
                        dns=DNS, zone=ZONE)
    trusted = TestCA(directory / "trusted", ["secret.test", "cdn-a.test", "cdn-b.test"])
    stranger = TestCA(directory / "stranger", ["untrusted.test"])  # a CA nobody trusts
    seen: list[dict[str, str]] = []
    servers = []
    for address, ca in ((SECRET_HOST, trusted), (CDN, trusted), (UNTRUSTED, stranger)):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(ca.certificate, ca.key)
        servers.append(_serve(internet, address, 8443, seen, context))
    servers.append(_serve(internet, CDN, 8080, seen, None))
    try:
        yield {"internet": internet, "seen": seen, "ca": trusted.ca}
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        internet.close()


@pytest.fixture(scope="module")
def https_daemon(world: dict[str, Any]) -> Iterator[DaemonHandle]:
    base = daemon_base()
    credentials = base / "credentials"
    credentials.mkdir(mode=0o700)
    token = credentials / "api-token"
    token.write_text(SECRET + "\n")
    token.chmod(0o600)
    config = CONFIG + '\n[agents.caller]\npolicy = "caller.yaml"\nstage = "prototype"\n'
    config = config.replace("[daemon]\n", "[daemon]\negress = true\n"
                            + world["internet"].daemon_settings()
                            + f'egress_credentials_dir = "{credentials}"\n'
                            f'egress_upstream_ca = "{world["ca"]}"\n', 1)
    write_daemon_dir(base, config)
    stages = base / "policies" / "stages.yaml"
    text = stages.read_text()
    at = text.index("    network: none\n")  # prototype's
    stages.write_text(text[:at] + CEILING + text[at + len("    network: none\n"):])
    (base / "policies" / "caller.yaml").write_text(POLICY)
    handle = start_daemon(base, keep_files=True)
    yield handle
    stop_daemon(handle)


PROBE = textwrap.dedent("""\
    import http.client, json, os, socket, ssl, sys, time, urllib.error, urllib.request
    out = {}
    def get(url, proxy=True, headers=None):
        opener = urllib.request.build_opener(
            *([] if proxy else [urllib.request.ProxyHandler({})]))
        try:
            with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
                return f"{r.status} {r.read().decode().strip()}"
        except urllib.error.HTTPError as e:
            return f"{e.code}"
        except Exception as e:
            return f"{type(e).__name__}: {e}"[:200]
    def raw(host, port, sni, via_connect=None):
        try:
            if via_connect:
                s = socket.create_connection(("100.127.255.254", 3128), timeout=10)
                s.sendall(f"CONNECT {via_connect} HTTP/1.1\\r\\n"
                          f"Host: {via_connect}\\r\\n\\r\\n".encode())
                head = s.recv(4096).decode()
                if not head.startswith("HTTP/1.1 200"):
                    return head.split("\\r\\n")[0]
            else:
                s = socket.create_connection((host, port), timeout=10)
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            with context.wrap_socket(s, server_hostname=sni) as t:
                t.sendall(f"GET /raw HTTP/1.1\\r\\nHost: {sni}\\r\\n\\r\\n".encode())
                return t.recv(200).decode().split("\\r\\n")[0]
        except Exception as e:
            return type(e).__name__
    def fronted(url_host, host_header, port, tls=True):
        c = (http.client.HTTPSConnection if tls else http.client.HTTPConnection)(
            url_host, port, timeout=10)
        try:
            c.request("GET", "/front", headers={"Host": host_header})
            return str(c.getresponse().status)
        except Exception as e:
            return type(e).__name__
    out["proxy"] = get("https://secret.test:8443/via-proxy",
                       headers={"Authorization": "Bearer worker-guess"})
    out["direct"] = get("https://secret.test:8443/direct", proxy=False)
    out["fronted"] = fronted("secret.test", "cdn-a.test", 8443)
    out["sni_allowed"] = raw("cdn-a.test", 8443, "cdn-a.test")
    out["sni_refused"] = raw("cdn-a.test", 8443, "cdn-b.test")
    out["connect_refused"] = get("https://cdn-b.test:8443/")
    out["connect_sni"] = raw(None, None, "cdn-b.test", via_connect="cdn-a.test:8443")
    try:  # not HTTP at all: answered 400, on record
        s = socket.create_connection(("100.127.255.254", 3128), timeout=10)
        s.sendall(b"\\x00\\x01garbage\\r\\n\\r\\n")
        out["connect_garbage"] = s.recv(100).decode(errors="replace").split("\\r\\n")[0]
    except OSError as e:
        out["connect_garbage"] = type(e).__name__
    out["http_allowed"] = fronted("cdn-a.test", "cdn-a.test", 8080, tls=False)
    out["http_fronted"] = fronted("cdn-a.test", "cdn-b.test", 8080, tls=False)
    out["untrusted"] = get("https://untrusted.test:8443/never")
    def parts(host, port, *chunks, pause=0.3, half_close=False):  # bytes, sent in pieces
        try:
            s = socket.create_connection((host, port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i, chunk in enumerate(chunks):
                if i:
                    time.sleep(pause)
                s.sendall(chunk)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            return s.recv(100).decode(errors="replace").split("\\r\\n")[0] or "closed"
        except OSError as e:
            return type(e).__name__
    out["split_http"] = parts("cdn-a.test", 8080, b"G",
                              b"ET /split HTTP/1.1\\r\\nHost: cdn-b.test\\r\\n\\r\\n")
    out["crlf_http"] = parts("cdn-a.test", 8080,
                             b"\\r\\nGET /crlf HTTP/1.1\\r\\nHost: cdn-b.test\\r\\n\\r\\n")
    big = bytes([1]) + (140000).to_bytes(3, "big")  # a ClientHello longer than any server reads
    out["big_hello"] = parts("cdn-a.test", 8443,
                             b"\\x16\\x03\\x01" + (16384).to_bytes(2, "big") + big
                             + bytes(16380), bytes(5))
    out["no_sni"] = raw("cdn-a.test", 8443, None)
    out["no_sni_connect"] = raw(None, None, None, via_connect="cdn-a.test:8443")
    out["connect_dotted"] = parts("100.127.255.254", 3128,
                                  b"CONNECT .cdn-a.test:8443 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    out["connect_closed"] = parts("100.127.255.254", 3128, b"CONN", half_close=True)
    out["env"] = dict(os.environ)
    dump = [open("/proc/self/environ", "rb").read().decode(errors="replace")]
    for top in ("/workspace", "/tmp", "/etc", "/run"):
        for directory, _, files in os.walk(top):
            for name in files:
                try:
                    dump.append(open(os.path.join(directory, name), "rb").read().decode(
                        errors="replace"))
                except OSError:
                    pass
    out["files"] = len(dump)
    out["trusted_ca"] = "agentd egress" in "".join(dump) or "BEGIN CERTIFICATE" in "".join(dump)
    sys.stderr.write("".join(dump))
    print(json.dumps(out))
    """)


class TestHttpsEgress:
    def test_names_checked_and_secret_injected_unseen(self, https_daemon: DaemonHandle,
                                                      world: dict[str, Any]) -> None:
        stub = https_daemon.stub()
        run = stub.CreateRun(pb.CreateRunRequest(agent="caller"))
        result = execute(stub, run.run_id, ["/usr/bin/python3", "-c", PROBE])
        assert result.outcome is not None
        assert result.outcome.exit_code == 0, result.stderr.decode()[-2000:]
        out = json.loads(result.stdout)
        seen: list[dict[str, str]] = world["seen"]

        # The secret reached the destination on both paths, replacing the worker's header...
        assert out["proxy"] == "200 page /via-proxy of secret.test:8443", out
        assert out["direct"] == "200 page /direct of secret.test:8443", out
        to_secret = [s for s in seen if s["server"] == f"{SECRET_HOST}:8443"]
        assert {s["path"] for s in to_secret} == {"/via-proxy", "/direct"}
        assert all(s["authorization"] == f"Bearer {SECRET}" for s in to_secret)
        # ...and a request for another name on the TLS the secret is for is refused.
        assert out["fronted"] == "421", out
        # Names sharing an address: only the allowed one passes, on every path.
        assert out["sni_allowed"] == "HTTP/1.0 200 OK", out
        assert out["sni_refused"] in ("ConnectionResetError", "SSLEOFError", "SSLError",
                                      "SSLZeroReturnError"), out
        assert "403" in out["connect_refused"], out
        assert out["connect_garbage"] == "HTTP/1.1 400 Bad Request", out
        assert out["connect_sni"] in ("ConnectionResetError", "SSLEOFError", "SSLError",
                                      "SSLZeroReturnError"), out
        assert out["http_allowed"] == "200", out
        assert out["http_fronted"] == "421", out
        # Split, padded, unreadable or nameless: refused, never carried (review findings).
        assert out["split_http"].startswith("HTTP/1.1 421"), out
        assert out["crlf_http"].startswith("HTTP/1.1 421"), out
        assert out["connect_closed"] == "HTTP/1.1 400 Bad Request", out
        for check in ("big_hello", "no_sni", "no_sni_connect"):
            assert out[check] in ("ConnectionResetError", "SSLEOFError", "SSLError",
                                  "SSLZeroReturnError", "closed"), (check, out)
        assert out["connect_dotted"] == "HTTP/1.1 403 Forbidden", out
        assert not any(s["host"].startswith("cdn-b.test") for s in seen), seen
        assert not any(s["path"] in ("/split", "/crlf") for s in seen), seen
        # A destination whose certificate is not trusted never gets the secret.
        assert "200" not in out["untrusted"], out
        assert not any(s["server"] == f"{UNTRUSTED}:8443" for s in seen), seen

        # The worker: the proxy and its run's CA, never the secret.
        assert out["env"]["https_proxy"] == "http://100.127.255.254:3128"
        assert out["env"]["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
        assert out["files"] > 3
        assert out["trusted_ca"]
        assert SECRET.encode() not in result.stdout + result.stderr
        audit = b"".join(p.read_bytes() for p in
                         (https_daemon.base / "state" / "audit").glob("audit-*.jsonl"))
        assert SECRET.encode() not in audit
        assert SECRET not in https_daemon.log()

        records = _records(https_daemon, run.run_id)
        connections = [r["details"] for r in records if r["event"] == "net.connection"]
        refused = [r["details"] for r in records if r["event"] == "net.refused"]
        secret_calls = [c for c in connections if c.get("secrets")]
        # The fronted request and the untrusted destination carried nothing: refusals only.
        assert len(secret_calls) == 2, connections
        assert all(c["secrets"] == ["api-token"] and c["tls"] == "ended at the proxy"
                   for c in secret_calls)
        assert {c["by"] for c in secret_calls} == {"proxy", "https-proxy"}
        reasons = [r["reason"] for r in refused]
        assert any("TLS server name cdn-b.test is not allowed" in r for r in reasons), reasons
        assert any("no egress entry allows cdn-b.test on port 8443" in r for r in reasons)
        assert any("differs from the CONNECT host cdn-a.test" in r for r in reasons), reasons
        assert any("Host cdn-b.test is not allowed on port 8080" in r for r in reasons)
        assert any("Host cdn-a.test differs from the TLS server name secret.test" in r
                   for r in reasons), reasons
        assert any("certificate for untrusted.test is not trusted" in r for r in reasons)
        assert any("ClientHello the proxy cannot read" in r for r in reasons), reasons
        assert sum("without a server name" in r for r in reasons) == 2, reasons
        assert any("no egress entry allows .cdn-a.test" in r for r in reasons), reasons
        # garbage, and a request cut short by its sender: each answered 400, on record
        assert sum(r.startswith("not an HTTP/1.1 request") for r in reasons) == 2, reasons
        assert sum("Host cdn-b.test is not allowed on port 8080" in r for r in reasons) == 3
        assert all(r["by"] in ("proxy", "https-proxy") for r in refused), refused

        # `agentctl timeline --json` carries the same records under the task, whole.
        shown = subprocess.run(
            [sys.executable, "-m", "agentd.cli.main", "--socket", str(https_daemon.socket()),
             "timeline", run.run_id, "--json"], capture_output=True, text=True, timeout=60,
            check=True)
        (step,) = json.loads(shown.stdout)["steps"]
        network = step["tasks"][0]["network"]
        assert [r for r in network if r["event"] == "net.connection"] == [
            {"event": "net.connection", **c} for c in connections]
        assert len([r for r in network if r["event"] == "net.refused"]) == len(refused)
        assert SECRET not in shown.stdout
