"""How both commands reach a NATS server: the seed URLs and credentials as one frozen dataclass,
their click options, and the keyword arguments nats-py's `connect()` takes for them.

    --broker-url nats://user:pass@nats-0:4222,nats://nats-1:4222   (or tls://, or token@host)
    --nats-creds FILE      a .creds file (JWT + NKey seed)
    --nats-nkey FILE       an NKey seed file
    --nats-tls-ca/--nats-tls-cert/--nats-tls-key FILE

nats-py is imported only when a connection is made (only NATS users pay for it).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import click

from .options import stack

SCHEMES = ("nats", "tls")
_SERVER = re.compile(r"(nats|tls)://([^\s@/]+@)?([^\s:/@,]+|\[[0-9a-fA-F:]+\])(:[0-9]{1,5})?")


def is_nats_url(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0] in SCHEMES


def valid_nats_url(url: str) -> bool:
    """One or more comma-separated nats:// or tls:// seed servers."""
    return all(_SERVER.fullmatch(part.strip()) for part in url.split(","))


def redact(url: str) -> str:
    """The URL(s) with credentials hidden, for logs."""
    return re.sub(r"://[^@/,]+@", "://***@", url)


@dataclass(frozen=True)
class NatsConnection:
    servers: tuple[str, ...]
    creds: str | None = None  # .creds file
    nkey: str | None = None  # NKey seed file
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_url(cls, url: str, **files: str | None) -> NatsConnection:
        return cls(servers=tuple(part.strip() for part in url.split(",")), **files)

    @property
    def shown(self) -> str:
        return redact(",".join(self.servers))

    def connect_options(self, name: str) -> dict:
        """Keyword arguments for `nats.connect` (without the reconnect policy)."""
        options: dict = {"servers": list(self.servers), "name": name}
        if self.creds:
            options["user_credentials"] = self.creds
        if self.nkey:
            options["nkeys_seed"] = self.nkey
        if self.tls_ca or self.tls_cert or any(s.startswith("tls://") for s in self.servers):
            import ssl

            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            options["tls"] = context
        return options


def _readable(ctx, param, value: str | None) -> str | None:
    if value is not None and not os.access(value, os.R_OK):
        raise click.BadParameter(f"cannot read {value}")
    return value


def connection_options(env_prefix: str):
    """The --nats-creds/--nats-nkey/--nats-tls-* options, as one decorator."""
    option = functools.partial(click.option, show_envvar=True, callback=_readable, metavar="FILE")
    return stack(
        [
            option("--nats-creds", envvar=env_prefix + "NATS_CREDS", help="NATS: a .creds file (user JWT and NKey seed)."),
            option("--nats-nkey", envvar=env_prefix + "NATS_NKEY", help="NATS: an NKey seed file."),
            option("--nats-tls-ca", envvar=env_prefix + "NATS_TLS_CA", help="NATS: CA certificates to verify the servers with."),
            option("--nats-tls-cert", envvar=env_prefix + "NATS_TLS_CERT", help="NATS: client certificate (with --nats-tls-key)."),
            option("--nats-tls-key", envvar=env_prefix + "NATS_TLS_KEY", help="NATS: client certificate's private key."),
        ]
    )


def connection_from_options(url: str, nats_creds, nats_nkey, nats_tls_ca, nats_tls_cert, nats_tls_key) -> NatsConnection:
    if bool(nats_tls_cert) != bool(nats_tls_key):
        raise click.UsageError("--nats-tls-cert and --nats-tls-key go together")
    return NatsConnection.from_url(url, creds=nats_creds, nkey=nats_nkey, tls_ca=nats_tls_ca, tls_cert=nats_tls_cert, tls_key=nats_tls_key)


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether a stream subject (with `*` and `>` wildcards) matches `subject`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)
