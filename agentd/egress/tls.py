"""TLS at the egress proxy: reading a ClientHello's name, a per-run CA, and ending TLS.

- `client_hello_name` reads the server name (SNI) from the first bytes a worker sends, so the
  proxy can check it against the policy before a byte reaches the destination. Written by
  hand: neither `ssl` nor `cryptography` parses a ClientHello that is not theirs to answer.
- `RunAuthority` is a run's own CA (made with `cryptography`, its key kept in the daemon's
  memory only; a leaf's key passes through a private file on the runtime tmpfs): it signs a
  certificate for each name the proxy ends TLS for, so the daemon can add a secret to a
  request the worker encrypted. Its name constraints permit only the
  names the policy's secrets go to, so even its key could not vouch for any other name, and
  it is trusted only inside that run's workers (its bundle is mounted over their trust store).
- `TlsEnd` is the worker-facing side of TLS on a connection the proxy has already read from
  (the ClientHello it inspected), which asyncio's start_tls cannot take.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentd.sandbox.mounts import CA_BUNDLE_PATH

MAX_HELLO: Final = 136 * 1024
"""Bytes a ClientHello may take: more than OpenSSL accepts (131,396), so a hello a server
would read is never one the proxy could not (post-quantum key shares make a usual one ~2 KiB)."""
BUNDLE_PATH: Final = CA_BUNDLE_PATH
"""Where a worker finds its trust store; the variables below point there."""
TRUST_ENV: Final = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                    "PIP_CERT", "NODE_EXTRA_CA_CERTS")
_VALID: Final = datetime.timedelta(days=7)
MAX_NAMES: Final = 256
"""Certificates a run's CA keeps made (a wildcard secret lets a worker ask for any name under
it: the oldest is made again if asked for after it was dropped)."""


class NotTls(ValueError):
    """The bytes are not a TLS handshake."""


def client_hello_name(data: bytes) -> str | None:
    """The SNI host name of the ClientHello at the start of `data`; "" when it has none;
    None when more bytes are needed. NotTls if `data` is not a TLS handshake."""
    body = bytearray()
    at = 0
    while True:  # reassemble the handshake from its records
        if len(data) < at + 5:
            return None
        kind, major, length = data[at], data[at + 1], int.from_bytes(data[at + 3:at + 5])
        if kind != 22 or major != 3 or length > 16384 + 2048:
            raise NotTls("not a TLS handshake record")
        if len(data) < at + 5 + length:
            return None
        body += data[at + 5:at + 5 + length]
        at += 5 + length
        if len(body) >= 4:
            if body[0] != 1:
                raise NotTls("the first handshake message is not a ClientHello")
            need = int.from_bytes(body[1:4])
            if need > MAX_HELLO:
                raise NotTls("ClientHello too large")
            if len(body) >= 4 + need:
                return _server_name(bytes(body[4:4 + need]))


def _server_name(hello: bytes) -> str:
    try:
        at = 2 + 32  # version, random
        at += 1 + hello[at]  # session id
        at += 2 + int.from_bytes(hello[at:at + 2])  # cipher suites
        at += 1 + hello[at]  # compression methods
        if at >= len(hello):
            return ""  # no extensions
        end = at + 2 + int.from_bytes(hello[at:at + 2])
        at += 2
        while at + 4 <= end:
            kind, size = int.from_bytes(hello[at:at + 2]), int.from_bytes(hello[at + 2:at + 4])
            at += 4
            if kind == 0:  # server_name: a list of (type, name); type 0 is a host name
                inner, stop = at + 2, at + size
                while inner + 3 <= stop:
                    name_type, length = hello[inner], int.from_bytes(hello[inner + 1:inner + 3])
                    name = hello[inner + 3:inner + 3 + length]
                    if name_type == 0:
                        return name.decode("ascii").lower().rstrip(".")
                    inner += 3 + length
                return ""
            at += size
    except (IndexError, UnicodeDecodeError) as exc:
        raise NotTls(f"a malformed ClientHello ({exc})") from None
    return ""


class RunAuthority:
    """One run's CA, constrained to `domains` (names or *.wildcards)."""

    def __init__(self, run_id: str, domains: tuple[str, ...], key_dir: str | None = None
                 ) -> None:
        self.run_id = run_id
        self.domains = domains
        self.key_dir = key_dir
        """Where a leaf's key passes (a 0700 directory, gone at once) for `load_cert_chain`:
        the daemon's runtime directory, a tmpfs, rather than /tmp."""
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agentd"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"agentd egress {run_id}")])
        permitted = sorted({d.removeprefix("*.") for d in domains})
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(d) for d in permitted],
                excluded_subtrees=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256()))
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def context_for(self, name: str) -> ssl.SSLContext:
        """A server context presenting a certificate for `name` signed by this CA (made once
        per name; the key goes through a private file only for `load_cert_chain`)."""
        with self._lock:
            context = self._contexts.get(name)
            if context is None:
                if len(self._contexts) >= MAX_NAMES:  # a wildcard's names are unbounded
                    del self._contexts[next(iter(self._contexts))]
                context = self._contexts[name] = self._make_context(name)
            return context

    def _make_context(self, name: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + _VALID)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # the proxy speaks HTTP/1.1 to the worker
        with tempfile.TemporaryDirectory(prefix="leaf-", dir=self.key_dir) as directory:
            path = Path(directory) / "leaf.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
                f.write(leaf.public_bytes(serialization.Encoding.PEM))
                f.write(self.pem())
            context.load_cert_chain(path)
        return context


class Authorities:
    """The per-run CAs of the runs that have secrets, and the trust bundles their workers
    mount (the host's bundle and the run's CA), in `directory`."""

    KEPT: Final = 64

    def __init__(self, directory: Path, system_bundle: str | None = None) -> None:
        self.directory = directory
        self.system_bundle = system_bundle or ssl.get_default_verify_paths().cafile \
            or BUNDLE_PATH
        self._runs: OrderedDict[tuple[str, tuple[str, ...]], RunAuthority] = OrderedDict()
        self._lock = threading.Lock()

    def start(self) -> None:
        """A fresh directory: the bundles of the daemon's last life are of CAs gone with it."""
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        for old in self.directory.glob("*.pem"):
            old.unlink(missing_ok=True)

    def of(self, run_id: str, domains: tuple[str, ...]) -> RunAuthority:
        """The run's CA for these secret domains, and its bundle written (blocking)."""
        key = (run_id, tuple(sorted(domains)))
        with self._lock:
            authority = self._runs.get(key)
            if authority is not None:
                self._runs.move_to_end(key)
                return authority
        authority = RunAuthority(run_id, key[1], key_dir=str(self.directory))
        self._write_bundle(authority)
        with self._lock:
            self._runs[key] = authority
            while len(self._runs) > self.KEPT:
                _, dropped = self._runs.popitem(last=False)
                # Workers that mounted it keep the file; a new task of that run gets a new CA.
                self.bundle_path(dropped).unlink(missing_ok=True)
        return authority

    def bundle_path(self, authority: RunAuthority) -> Path:
        serial = format(authority.certificate.serial_number, "x")[:16]
        return self.directory / f"{authority.run_id}-{serial}.pem"

    def _write_bundle(self, authority: RunAuthority) -> None:
        try:
            system = Path(self.system_bundle).read_bytes()
        except OSError:
            system = b""  # a host without a bundle: the worker trusts the run's CA only
        path = self.bundle_path(authority)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(system.rstrip(b"\n") + b"\n" + authority.pem())
        temporary.chmod(0o644)
        temporary.replace(path)


class TlsEnd:
    """The server side of TLS over an asyncio stream, fed the bytes already read from it."""

    def __init__(self, context: ssl.SSLContext, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, initial: bytes) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._incoming.write(initial)
        self._reader, self._writer = reader, writer

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError("the worker closed during the TLS handshake")\
                        from None

    async def read(self, size: int) -> bytes:
        while True:
            try:
                return self._tls.read(size)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def write(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            pending = self._outgoing.read()
            if pending:
                self._writer.write(pending)
        self._writer.close()

    async def _fill(self) -> bool:
        data = await self._reader.read(64 * 1024)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()
