"""CURVE keys for the ZeroMQ port, in the file format of pyzmq's `zmq.auth` (ZeroMQ's own
certificate format: a `curve` section with `public-key` and, in `*.key_secret` files,
`secret-key`, both Z85).

    telemetry-broker keygen DIR --name NAME   writes DIR/NAME.key (public) and DIR/NAME.key_secret (0600)
    broker:  --curve-secret-key FILE          its own key pair (a .key_secret file)
             --curve-authorized-keys DIR      the allow-list: every DIR/*.key is a client allowed in
    clients: --curve-server-key FILE          the broker's public key (its .key file)
             --curve-client-key FILE          the client's own key pair (its .key_secret file)

The broker checks each connecting client's public key with a ZAP handler (pyzmq's
ThreadAuthenticator, the ZeroMQ way: libzmq asks it during the handshake, before any frame of
that peer reaches the broker). The allow-list is an `AllowList`, whose set of keys is replaced
as a whole on reload (SIGHUP), so a handshake sees either the old set or the new one.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.utils import z85


class KeyFileError(Exception):
    """A key file or directory is missing, unreadable or not a key; one line for the user."""


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs to connect to a CURVE broker (Z85 bytes); picklable, for workers."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key_file: str, client_key_file: str) -> ClientKeys:
        server_public = load_public_key(server_key_file)
        public, secret = load_key_pair(client_key_file)
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client (before it connects)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def _load(path: str) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise KeyFileError(f"key file {path} does not exist or is not a file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise KeyFileError(f"{path} is not a CURVE key file (make one with `telemetry-broker keygen`)") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeyFileError(f"{path} has a key that is not 40 Z85 characters")
    try:
        z85.decode(public)
        if secret is not None:
            z85.decode(secret)
    except ValueError:
        raise KeyFileError(f"{path} has a key that is not Z85") from None
    return public, secret


def load_public_key(path: str) -> bytes:
    """The public key in a .key (or .key_secret) file."""
    return _load(path)[0]


def load_key_pair(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a .key_secret file."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path} has no secret key (give the .key_secret file)")
    return public, secret


def load_authorized_keys(directory: str) -> frozenset[bytes]:
    """The public keys of every DIR/*.key file (as zmq.auth.load_certificates reads them)."""
    if not os.path.isdir(directory):
        raise KeyFileError(f"authorized keys directory {directory} does not exist or is not a directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise KeyFileError(f"cannot read authorized keys directory {directory}: permission denied")
    return frozenset(load_public_key(path) for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.key"))))


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Write DIR/NAME.key and DIR/NAME.key_secret (the secret readable by its owner only);
    refuses to overwrite. Returns both paths."""
    public_file = os.path.join(directory, name + ".key")
    secret_file = public_file + "_secret"
    for path in (public_file, secret_file):
        if os.path.lexists(path):
            raise KeyFileError(f"{path} already exists (keys are never overwritten)")
    old_umask = os.umask(0o077)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        zmq.auth.create_certificates(directory, name)
    except OSError as exc:
        raise KeyFileError(f"cannot write keys in {directory}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(public_file, 0o644)  # the public half is meant to be handed out
    return public_file, secret_file


class AllowList:
    """The ZAP handler's credentials provider (zmq.auth `configure_curve_callback`): a client is
    let in when its public key is in the set. `keys` is replaced, never mutated."""

    def __init__(self, keys: frozenset[bytes] = frozenset()):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys
