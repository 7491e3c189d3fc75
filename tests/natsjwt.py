"""Decentralized NATS auth for tests: an operator, a system account and an account with JetStream,
users of it, as the JWTs `nsc` would write, signed with NKeys (the `nkeys` package nats-py uses).

A NATS JWT is `base64url(header).base64url(claims).base64url(ed25519 signature of the first two)`,
header `{"typ":"JWT","alg":"ed25519-nkey"}`, claims `{jti, iat, iss, name, sub, [exp], nats: {type,
version: 2, ...}}` (github.com/nats-io/jwt v2). The operator signs itself and the accounts, an
account signs its users. The real nats-server checks the whole chain: a mistake here makes the
tests fail, it cannot make them pass. The server trusts the operator and preloads the accounts
(`resolver: MEMORY`); a user connects with a .creds file: its JWT and its NKey seed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time

import nkeys

UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
JETSTREAM_UNLIMITED = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Key:
    """An NKey pair of one kind (operator, account, user)."""

    def __init__(self, prefix: int):
        self.seed = nkeys.encode_seed(os.urandom(32), prefix).decode()
        self.pair = nkeys.from_seed(bytearray(self.seed.encode()))
        self.public = self.pair.public_key.decode()

    def sign_jwt(self, subject: str, name: str, nats: dict, expires: int | None = None) -> str:
        claims = {"iat": int(time.time()), "iss": self.public, "name": name, "sub": subject, "nats": {**nats, "version": 2}}
        if expires is not None:
            claims["exp"] = expires
        claims["jti"] = base64.b32encode(hashlib.new("sha512_256", json.dumps(claims, sort_keys=True).encode()).digest()).decode().rstrip("=")
        signed = _b64(b'{"typ":"JWT","alg":"ed25519-nkey"}') + "." + _b64(json.dumps(claims).encode())
        return signed + "." + _b64(self.pair.sign(signed.encode()))


class Operator:
    """An operator with a system account and one account (JetStream enabled, no limits)."""

    def __init__(self, name: str = "telemetry-operator"):
        self.key = Key(nkeys.PREFIX_BYTE_OPERATOR)
        self.jwt = self.key.sign_jwt(self.key.public, name, {"type": "operator"})
        self.system = Key(nkeys.PREFIX_BYTE_ACCOUNT)
        self.account = Key(nkeys.PREFIX_BYTE_ACCOUNT)
        self.accounts = {
            self.system.public: self.key.sign_jwt(self.system.public, "SYS", {"type": "account", "limits": UNLIMITED}),
            self.account.public: self.key.sign_jwt(
                self.account.public,
                "telemetry",
                {"type": "account", "limits": {**UNLIMITED, **JETSTREAM_UNLIMITED}, "default_permissions": {"pub": {}, "sub": {}}},
            ),
        }

    def server_conf(self) -> str:
        """nats-server configuration: trust this operator, its accounts preloaded."""
        preload = "".join(f"  {public}: {jwt}\n" for public, jwt in self.accounts.items())
        return f"operator: {self.jwt}\nsystem_account: {self.system.public}\nresolver: MEMORY\nresolver_preload: {{\n{preload}}}\n"

    def user_creds(self, path, name: str = "streamer", *, signer: Key | None = None, expires: int | None = None, seed: str | None = None) -> str:
        """A user of the account (or signed by `signer`), its .creds file written to `path`."""
        user = Key(nkeys.PREFIX_BYTE_USER)
        jwt = (signer or self.account).sign_jwt(user.public, name, {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}, expires)
        text = (
            f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed or user.seed}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n"
        )
        with open(path, "w") as f:
            f.write(text)
        return str(path)
