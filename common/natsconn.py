"""How both commands reach a NATS server: the seed URLs and credentials as one frozen dataclass,
their click options, and the keyword arguments nats-py's `connect()` takes for them.

    --broker-url nats://user:pass@nats-0:4222,nats://nats-1:4222   (or tls://, or token@host)
    --nats-creds FILE      a .creds file (JWT + NKey seed)
    --nats-nkey FILE       an NKey seed file
    --nats-tls-ca/--nats-tls-cert/--nats-tls-key FILE

TLS is required, never optional, once asked for: a `tls://` URL or any --nats-tls-* file makes
`open_client` refuse a server that does not offer TLS before anything (credentials included) is
sent in the clear; nats-py alone would carry on in plain text. A `nats://` URL to a server that
requires TLS is upgraded (verified against --nats-tls-ca, else the system's CAs).

The files are checked when the options are read (`connection_from_options`): a certificate or key
that does not load, a seed that is not an NKey seed, a .creds file without its JWT and seed blocks
are usage errors (nats-py would read them only at connect time, and loops forever on a .creds file
without a JWT). `failure` turns what a server or the TLS handshake refused into one line.

nats-py is imported only when a connection is made (only NATS users pay for it).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import ssl

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


def address(url) -> str | None:
    """HOST:PORT of a parsed server URL (nats-py's `connected_url`), never its user, password or token."""
    if url is None:
        return None
    host = f"[{url.hostname}]" if url.hostname and ":" in url.hostname else url.hostname
    return f"{host}:{url.port}" if url.port else str(host)


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

    @property
    def wants_tls(self) -> bool:
        """TLS was asked for: a tls:// URL, or a --nats-tls-* file."""
        return bool(self.tls_ca or self.tls_cert) or any(s.startswith("tls://") for s in self.servers)

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the servers (against `tls_ca`, else the system's CAs); presents the client certificate if given."""
        import ssl  # here, not at the top: only TLS users need OpenSSL loaded

        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def connect_options(self, name: str) -> dict:
        """Keyword arguments for `nats.connect` (without the reconnect policy)."""
        options: dict = {"servers": list(self.servers), "name": name}
        if self.creds:
            options["user_credentials"] = self.creds
        if self.nkey:
            options["nkeys_seed"] = self.nkey
        if self.wants_tls:
            options["tls"] = self.ssl_context()
        return options

    async def open_client(self, name: str, **options):
        """A connected nats-py client (`options`: nats-py's, e.g. the reconnect policy and callbacks).

        With TLS asked for, a server that neither requires nor offers TLS is refused at every
        (re)connection, after its INFO and before our CONNECT: nats-py upgrades only when the
        server requires TLS, so it is told to upgrade when the server merely offers it."""
        import nats

        nc = nats.NATS()
        if self.wants_tls:
            process_info = nc._process_info

            async def require_tls(info: dict, initial_connection: bool = False) -> None:
                if initial_connection and not info.get("tls_required"):
                    if not info.get("tls_available"):
                        raise TlsNotOffered("the server does not offer TLS (tls:// or --nats-tls-* ask for it; nothing was sent)")
                    info["tls_required"] = True  # the same dict nats-py checks next: upgrade
                await process_info(info, initial_connection)

            nc._process_info = require_tls
        await nc.connect(**{**self.connect_options(name), **options})
        return nc


class TlsNotOffered(ConnectionError):
    """TLS was asked for and the server does not offer it (an OSError: nats-py counts it as a failed
    connection, tries the next server and, when reconnecting, keeps trying)."""


def failure(exc: BaseException) -> str | None:
    """One line for a refusal that waiting will not cure (TLS, credentials); None for anything else
    (a server not up yet, a timeout)."""
    import ssl

    if isinstance(exc, TlsNotOffered):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's TLS certificate did not verify ({exc.verify_message}); give the CA that signed it with --nats-tls-ca"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if "CERTIFICATE_REQUIRED" in reason:
            return "the server requires a client certificate (give --nats-tls-cert and --nats-tls-key)"
        if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
            return f"the server refused the client certificate ({reason}): it must be signed by a CA the server trusts"
        return f"TLS handshake failed ({reason})"
    text = str(exc).lower()
    if "authorization violation" in text or "authentication" in text:  # also "user authentication expired"
        return f"the server refused the credentials ({str(exc).removeprefix('nats: ').strip(chr(39))})"
    return None


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
    connection = NatsConnection.from_url(url, creds=nats_creds, nkey=nats_nkey, tls_ca=nats_tls_ca, tls_cert=nats_tls_cert, tls_key=nats_tls_key)
    if connection.wants_tls:
        _check_tls(nats_tls_ca, nats_tls_cert, nats_tls_key)
    if nats_nkey:
        _check_seed(_read(nats_nkey), "--nats-nkey", nats_nkey)
    if nats_creds:
        _check_creds(nats_creds)
    return connection


def _check_tls(ca: str | None, cert: str | None, key: str | None) -> None:
    import ssl

    try:
        context = ssl.create_default_context(cafile=ca)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot load CA certificates from {ca} ({getattr(exc, 'reason', None) or exc})", param_hint="'--nats-tls-ca'") from None
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise click.UsageError(f"--nats-tls-cert/--nats-tls-key: cannot load the client certificate {cert} with key {key} ({reason})") from None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 20)


def _check_seed(text: bytes, option: str, path: str) -> None:
    import nkeys

    try:
        nkeys.from_seed(bytearray(text.strip())).public_key  # noqa: B018 (decodes and checks the seed)
    except Exception:
        raise click.BadParameter(f"{path} is not an NKey seed (one line, starting with S)", param_hint=f"'{option}'") from None


_CREDS_BLOCK = re.compile(rb"-{3,}BEGIN ([A-Z ]+)-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}END \1-{3,}")


def _check_creds(path: str) -> None:
    """A .creds file holds a `NATS USER JWT` block and a `USER NKEY SEED` block (as `nsc` writes it)."""
    blocks = {name: value for name, value in _CREDS_BLOCK.findall(_read(path))}
    jwt = blocks.get(b"NATS USER JWT")
    if jwt is None:
        raise click.BadParameter(f"{path} is not a .creds file (no NATS USER JWT block)", param_hint="'--nats-creds'")
    if jwt.count(b".") != 2:
        raise click.BadParameter(f"{path}: its NATS USER JWT block holds no JWT", param_hint="'--nats-creds'")
    if b"USER NKEY SEED" not in blocks:
        raise click.BadParameter(f"{path} is not a .creds file (no USER NKEY SEED block)", param_hint="'--nats-creds'")
    _check_seed(blocks[b"USER NKEY SEED"], "--nats-creds", path)


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether a stream subject (with `*` and `>` wildcards) matches `subject`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)
