"""The daemon's credentials: secret values the egress proxy adds to requests.

A secret's value lives in one file of the credentials directory, named as the policy names
it: by default systemd's $CREDENTIALS_DIRECTORY (LoadCredential= in the unit, readable only
by the service), else /etc/agentd/credentials. Values are read when a task opens and kept
in the daemon's memory for that task only; they are never sent to a worker, written to a
record or a log (records name the secret), and never taken from a caller.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agentd.policy.egress import SecretRule, header_value_ok, secret_from_text

DEFAULT_DIRECTORY: Final = "/etc/agentd/credentials"
MAX_SECRET: Final = 8192


class SecretUnavailable(Exception):
    """A policy's secret the daemon cannot read; the message says which and what to do."""


@dataclass(frozen=True)
class LoadedSecret:
    rule: SecretRule
    value: str

    def __repr__(self) -> str:  # never the value, in a traceback or a log line
        return f"LoadedSecret({self.rule.name!r})"


def credentials_directory(configured: str = "") -> Path:
    """The configured directory, else systemd's $CREDENTIALS_DIRECTORY, else the default."""
    return Path(configured or os.environ.get("CREDENTIALS_DIRECTORY") or DEFAULT_DIRECTORY)


def load(directory: Path, texts: Iterable[str]) -> tuple[LoadedSecret, ...]:
    """The values of an effective policy's `egress_secrets` (blocking: reads files)."""
    loaded = []
    for text in texts:
        rule = secret_from_text(text)
        path = directory / rule.name
        fix = (f"put it in {path} (mode 0600, owned by root), or LoadCredential={rule.name}:..."
               " in the agentd unit, or remove the secret from the policy")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SecretUnavailable(f"the policy's secret {rule.name!r} cannot be read"
                                    f" ({exc.strerror}); {fix}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SecretUnavailable(f"the policy's secret {rule.name!r} is not a regular"
                                        f" file; {fix}")
            if info.st_mode & 0o007:
                raise SecretUnavailable(f"the secret file {path} may be read by any user"
                                        f" (mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it")
            data = os.read(fd, MAX_SECRET + 1)
        finally:
            os.close(fd)
        value = data.decode("utf-8", "replace").rstrip("\r\n")
        if len(data) > MAX_SECRET or not header_value_ok(rule.value(value)):
            raise SecretUnavailable(f"the secret {rule.name!r} must be one line of at most"
                                    f" {MAX_SECRET} bytes of visible ASCII, with no space or tab"
                                    f" at either end ({path})")
        loaded.append(LoadedSecret(rule, value))
    return tuple(loaded)


def headers_for(secrets: Iterable[LoadedSecret], name: str) -> list[tuple[str, str]]:
    """(header, value) pairs sent with every request to `name`."""
    return [(s.rule.header, s.rule.value(s.value)) for s in secrets if s.rule.applies_to(name)]


def names_for(secrets: Iterable[LoadedSecret], name: str) -> list[str]:
    """The names of the secrets sent to `name` (what records show)."""
    return [s.rule.name for s in secrets if s.rule.applies_to(name)]


def values_for(secrets: Iterable[LoadedSecret], name: str) -> list[bytes]:
    """The values sent to `name`: what a response from it must not hold (agentd/egress/http.py
    cuts it)."""
    return [s.value.encode() for s in secrets if s.rule.applies_to(name)]
