"""Protection of the HTTP side, for the broker's HTTP and the streamer's own (streamer.health):

--http-token-file FILE   every path wants `Authorization: Bearer <token>`, except /healthz and
                         /readyz (probes) and the web console's own files (they carry no data;
                         common.webconsole.is_public); a missing or wrong token is a 401 with a
                         JSON body. Compared in constant time (hmac.compare_digest).
--http-tls-cert FILE     with --http-tls-key: serve HTTPS (a PEM certificate chain and its key)
"""

from __future__ import annotations

import hmac
import ssl

import orjson
from aiohttp import web

from .webconsole import is_public

PROBES = ("/healthz", "/readyz")
MAX_TOKEN_BYTES = 4096


class HttpSecurityError(Exception):
    """A token file or TLS file is missing, unreadable or unusable; one line for the user."""


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding white space removed); it must be printable ASCII, 16+ characters."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise HttpSecurityError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise HttpSecurityError(f"token file {path} is larger than {MAX_TOKEN_BYTES} bytes")
    token = raw.strip()
    if len(token) < 16 or not all(0x21 <= b <= 0x7E for b in token):
        raise HttpSecurityError(f"token file {path} must hold one token of at least 16 printable ASCII characters without spaces")
    return token.decode("ascii")


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for HTTPS (TLS 1.2 or later)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:  # (an OSError too)
        what = "not PEM, or the key does not match the certificate" if exc.reason in (None, "PEM lib") else exc.reason
        raise HttpSecurityError(f"cannot use TLS certificate {cert_file} with key {key_file}: {what}") from None
    except OSError as exc:
        raise HttpSecurityError(f"cannot read TLS certificate {cert_file} or key {key_file}: {exc.strerror or exc}") from None
    return context


_UNAUTHORIZED = orjson.dumps({"error": "unauthorized: send Authorization: Bearer <token>"})


def token_middleware(token: str):
    """aiohttp middleware: the bearer token on every path but the probes and the console's files."""
    expected = b"Bearer " + token.encode("ascii")

    @web.middleware
    async def require_token(request: web.Request, handler):
        path = request.path
        if path in PROBES or is_public(path):
            return await handler(request)
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return web.Response(body=_UNAUTHORIZED, status=401, content_type="application/json", headers={"WWW-Authenticate": 'Bearer realm="telemetry"'})
        return await handler(request)

    return require_token
