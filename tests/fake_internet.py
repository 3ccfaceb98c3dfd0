"""A fake internet for egress tests: a network namespace the test makes, its servers and DNS.

The namespace (`ip netns add`) holds the test's addresses on its loopback and has no route to
the host's uplink. A daemon under test is told to connect out from it (`egress_uplink_netns`)
and to ask its DNS server (`egress_upstream`), so every packet stays inside namespaces the
test or the daemon made. Servers are added per test module: `serve_tcp` (a line of hello),
`serve_https` (pages over TLS, with a certificate from `TestCA`), `serve_udp` (an echo). What
they saw is in `seen`, the names asked of the DNS server in `queries`.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dnslib import QTYPE, RR, A, DNSRecord

from agentd.sandbox import netns


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _HTTPServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class Internet:
    """The fake internet: its namespace, servers and what they saw.

    `zone` maps a name to (address, ttl) for the DNS server on `dns`; `addresses` are the
    other addresses its hosts have."""

    def __init__(self, name: str, *, addresses: Iterable[str], dns: str,
                 zone: Mapping[str, tuple[str, int]]) -> None:
        self.name = name
        self.path = f"/run/netns/{name}"
        self.dns_address = dns
        self.zone = dict(zone)
        self.seen: list[str] = []
        self.queries: list[str] = []
        self._servers: list[socketserver.BaseServer] = []
        self._udp: list[socket.socket] = []
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            for command in (["link", "set", "lo", "up"],
                            *(["addr", "add", f"{a}/32", "dev", "lo"]
                              for a in (*addresses, dns))):
                subprocess.run(["ip", "-n", name, *command], check=True)
            self.ns = netns.Namespace(netns.open_path(self.path), "inet")
        except BaseException:
            subprocess.run(["ip", "netns", "del", name], check=False)
            raise
        self.dns = self._serve_dns()

    def daemon_settings(self) -> str:
        """The `[daemon]` lines that send a daemon's egress through this internet."""
        return (f'egress_upstream = "{self.dns_address}"\n'
                f'egress_uplink_netns = "{self.path}"\n')

    def serve_tcp(self, address: str, port: int) -> None:
        """A server that says `hello from ADDRESS:PORT` and waits for the other side to
        close."""
        seen = self.seen

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                seen.append(f"{address}:{port}")
                self.request.sendall(f"hello from {address}:{port}\n".encode())
                with contextlib.suppress(OSError):
                    while self.request.recv(4096):  # until the other side closes
                        pass

        self._start(self.ns.call(lambda: _Server((address, port), Handler)))

    def serve_https(self, address: str, port: int, certificate: Path, key: Path,
                    pages: Mapping[str, bytes]) -> None:
        """An HTTPS server: GET of a path in `pages` is 200 with its bytes, anything else
        404. Each request is noted in `seen` as `ADDRESS:PORT HOST PATH`."""
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(f"{address}:{port} {self.headers.get('Host')} {self.path}")
                body = pages.get(self.path)
                self.send_response(200 if body is not None else 404)
                body = body if body is not None else b"not found\n"
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: `seen` is the log

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)

        def make() -> _HTTPServer:
            server = _HTTPServer((address, port), Handler)
            server.socket = context.wrap_socket(server.socket, server_side=True)
            return server

        self._start(self.ns.call(make))

    def serve_udp(self, address: str, port: int) -> None:
        """A UDP echo server: each datagram goes back to its sender, and is noted in `seen`
        as `udp ADDRESS:PORT SIZE`."""
        sock = self.ns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.bind((address, port))
        self._udp.append(sock)

        def loop() -> None:
            while True:
                try:
                    data, peer = sock.recvfrom(65535)
                    self.seen.append(f"udp {address}:{port} {len(data)}")
                    sock.sendto(data, peer)
                except OSError:
                    return

        threading.Thread(target=loop, daemon=True).start()

    def _start(self, server: socketserver.BaseServer) -> None:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._servers.append(server)

    def _serve_dns(self) -> socket.socket:
        sock = self.ns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.bind((self.dns_address, 53))

        def loop() -> None:
            while True:
                try:
                    data, peer = sock.recvfrom(4096)
                except OSError:
                    return
                query = DNSRecord.parse(data)
                name = str(query.q.qname).rstrip(".")
                self.queries.append(name)
                reply = query.reply()
                if name in self.zone and query.q.qtype == QTYPE.A:
                    address, ttl = self.zone[name]
                    reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(address), ttl=ttl))
                sock.sendto(reply.pack(), peer)

        threading.Thread(target=loop, daemon=True).start()
        return sock

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self.dns.close()
        for sock in self._udp:
            sock.close()
        self.ns.close()
        subprocess.run(["ip", "netns", "del", self.name], check=False)


class TestCA:
    """A certificate authority for the fake internet's HTTPS servers: `ca` (PEM) is what a
    client must trust, `certificate` and `key` what a server for `names` presents."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, names: Iterable[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentd test CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(
                  digital_signature=False, content_commitment=False, key_encipherment=False,
                  data_encipherment=False, key_agreement=False, key_cert_sign=True,
                  crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
        names = list(names)
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(n) if not _is_address(n)
                     else x509.IPAddress(ipaddress.ip_address(n)) for n in names]),
                    critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca = directory / "ca.pem"
        self.certificate = directory / "server.pem"
        self.key = directory / "server.key"
        self.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.certificate.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        self.key.chmod(0o600)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def trusting(ca: Path) -> list[str]:
    """A command prefix that runs a program (a test daemon) in a mount namespace of its own
    where the system's CA bundle, /etc/ssl/certs/ca-certificates.crt, is `ca`: its workers,
    which bind /etc/ssl from the daemon's view of the host, trust the fake internet's servers
    and nothing else, and the host's own file is untouched. The program is exec'd, so its pid
    is the prefix's."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$0" /etc/ssl/certs/ca-certificates.crt && exec "$@"', str(ca)]
