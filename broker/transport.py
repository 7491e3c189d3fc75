"""The broker's ZeroMQ side: the ROUTER socket, the receive loop (frames in bursts), sending
without waiting, and the connection monitor (counts of accepted, closed, failed and refused
connections).

With CURVE (--curve-secret-key, --curve-authorized-keys; broker.curve) the ROUTER is a CURVE
server on every endpoint it binds, and a ZAP handler (pyzmq's ThreadAuthenticator, on its own
thread so handshakes do not wait for a busy event loop) admits only the allow-listed public keys:
a peer without an allowed key never gets a frame through. Refusals are counted by reason from
the socket monitor and logged at a bounded rate. The embedded broker's own workers (ipc://) get a
key pair made at start and allowed in memory only (`local_client_keys`).

It knows nothing about what frames mean: the receive loop hands each frame to `handle` and
calls `end_burst` once a burst has been handled (see broker.server for the wiring).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import protocol as p
from .config import BrokerConfig
from .curve import AllowList, ClientKeys, KeyFileError, load_authorized_keys, load_key_pair
from .throttle import LogThrottle

log = logging.getLogger("broker")

BURST = 64  # frames handled (and made durable together) before the loop lets other tasks run
CLOSE_LINGER_MS = 200  # at close, how long queued frames (the goodbyes) may take to leave

ZMQ_SENT, ZMQ_AGAIN, ZMQ_GONE = range(3)
_CONNECTION_EVENTS = {
    zmq.EVENT_ACCEPTED: "accepted",
    zmq.EVENT_DISCONNECTED: "closed",
    zmq.EVENT_ACCEPT_FAILED: "accept_failed",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
}
ZAP_DOMAIN = b"telemetry"
# why a CURVE handshake failed: the peer's key is not allowed, it does not speak CURVE, or anything
# else (its handshake does not decrypt, as with a wrong server key; not ZeroMQ; it left mid-way)
REFUSED_UNKNOWN_KEY, REFUSED_NO_CURVE, REFUSED_BAD_HANDSHAKE = "unknown_key", "no_curve", "bad_handshake"
_REFUSALS = {zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: REFUSED_NO_CURVE}


class TransportStartError(Exception):
    """The ZeroMQ address cannot be bound; the message is one line for the user."""


class Transport:
    def __init__(self, config: BrokerConfig, throttle: LogThrottle):
        self.config = config
        self.url = ""
        self.connections: Counter = Counter()  # accepted, closed, handshake_failed, accept_failed, refused
        self.refused: Counter = Counter()  # CURVE refusals by reason (REFUSED_*)
        self._throttle = throttle
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._readable = asyncio.Event()  # the ROUTER may have frames to read (see receive)
        self._ipc_dir: str | None = None
        self._authenticator = None  # zmq.auth.thread.ThreadAuthenticator, with CURVE
        self._allowed = AllowList()
        self._local_keys: ClientKeys | None = None
        self._server_public = b""

    def bind(self) -> None:
        """Bind the ROUTER (port 0 picks a free port) and start its monitor. Raises TransportStartError."""
        cfg = self.config
        if cfg.curve is not None:
            try:
                self._server_public, server_secret = load_key_pair(cfg.curve.secret_key_file)
                self._allowed.keys = load_authorized_keys(cfg.curve.authorized_keys_dir)
            except KeyFileError as exc:
                raise TransportStartError(str(exc)) from None
            log.info("Broker: CURVE on: %d client keys allowed (from %s)", len(self._allowed.keys), cfg.curve.authorized_keys_dir)
            if not self._allowed.keys:
                log.warning("Broker: no client keys in %s: every ZeroMQ client is refused until keys are added and SIGHUP sent", cfg.curve.authorized_keys_dir)
        # the ROUTER is a plain socket driven by the loop's reader callback (see receive): no
        # future per frame; only the monitor, which is rare, is awaited through zmq.asyncio
        self._ctx = zmq.Context()
        if cfg.curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._authenticator = ThreadAuthenticator(self._ctx, log=logging.getLogger("broker.zap"))
            self._authenticator.start()
            self._authenticator.configure_curve_callback(ZAP_DOMAIN.decode(), self._allowed)
        router = self._ctx.socket(zmq.ROUTER)
        if cfg.curve is not None:
            router.setsockopt(zmq.CURVE_SERVER, 1)
            router.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
            router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, p.frame_limit(cfg.max_message_bytes))  # larger: ZeroMQ drops the connection
        router.setsockopt(zmq.RCVHWM, 10_000)
        router.setsockopt(zmq.SNDHWM, 100_000)  # subscribers are bounded by their credit, not by this
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or vanished peer is reported, not silently skipped
        try:
            router.bind(f"tcp://{cfg.host}:{cfg.port or '*'}")
        except zmq.ZMQError as exc:
            router.close()
            self._stop_authenticator()
            self._ctx.term()
            self._ctx = None
            raise TransportStartError(f"cannot listen for ZeroMQ on {cfg.host}:{cfg.port}: {exc.strerror}") from None
        self._router = router
        self.url = router.getsockopt_string(zmq.LAST_ENDPOINT)
        monitor_url = f"inproc://broker-monitor-{id(self)}"
        router.monitor(monitor_url, sum(_CONNECTION_EVENTS))  # distinct bits: the sum is their union
        self._monitor = zmq.asyncio.Context.shadow(self._ctx).socket(zmq.PAIR)
        self._monitor.connect(monitor_url)

    @property
    def curve(self) -> bool:
        return self._authenticator is not None

    def reload_keys(self) -> None:
        """Read the authorized keys directory again (SIGHUP). New handshakes see the new set; a
        connection already made with a key now removed stays open until it reconnects. On an
        error the old set stays."""
        if self.config.curve is None:
            log.info("Broker: SIGHUP: no CURVE keys to reload")
            return
        directory = self.config.curve.authorized_keys_dir
        try:
            keys = load_authorized_keys(directory)
        except KeyFileError as exc:
            log.error("Broker: authorized keys not reloaded (%s); keeping the %d keys in use", exc, len(self._allowed.keys))
            return
        old = self._allowed.keys - self._local_only()
        added, removed = len(keys - old), len(old - keys)
        self._allowed.keys = keys | self._local_only()
        log.info("Broker: authorized keys reloaded from %s: %d keys (%d added, %d removed)", directory, len(keys), added, removed)
        if removed:
            log.warning("Broker: connections already open with a removed key stay open until they reconnect (restart the broker to cut them)")

    def _local_only(self) -> frozenset[bytes]:
        return frozenset((self._local_keys.public,)) if self._local_keys is not None else frozenset()

    def local_client_keys(self) -> ClientKeys | None:
        """With CURVE: a key pair for this process's own workers, made now and allowed in memory
        only (it is never written anywhere; the workers get it through their spawn arguments)."""
        if not self.curve:
            return None
        if self._local_keys is None:
            public, secret = zmq.curve_keypair()
            self._local_keys = ClientKeys(self._server_public, public, secret)
            self._allowed.keys = self._allowed.keys | {public}
        return self._local_keys

    def local_endpoint(self) -> str:
        """An extra endpoint for producers on this machine: a Unix socket (ipc://), in Linux's
        abstract namespace (no file, so nothing is left behind even after kill -9; reachable by
        local processes, as the TCP port on 127.0.0.1 is), elsewhere in a private directory
        removed at close; the TCP endpoint where ipc:// is unavailable."""
        name = f"telemetry-broker-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            if sys.platform.startswith("linux"):
                url = f"ipc://@{name}"
            else:
                self._ipc_dir = tempfile.mkdtemp(prefix="telemetry-broker-")
                url = f"ipc://{self._ipc_dir}/zmq.sock"
            self._router.bind(url)
        except (OSError, zmq.ZMQError) as exc:
            log.debug("Broker: no ipc:// endpoint (%s); local producers use %s", exc, self.url)
            return self.url
        return url

    async def receive(self, handle: Callable[[list[bytes]], None], end_burst: Callable[[float], object]) -> None:
        """Handle frames in bursts: whatever is already queued (up to BURST), then `end_burst(started)`
        (the burst is made durable and answered there).

        ZeroMQ's descriptor only says that the socket's state changed (edge-triggered), so after
        every wake-up the socket is read until it has nothing, and ZMQ_EVENTS is checked before
        sleeping again, as the ZeroMQ guide says."""
        router = self._router
        recv = router.recv_multipart
        loop = asyncio.get_running_loop()
        readable = self._readable
        loop.add_reader(router.FD, readable.set)
        try:
            while True:
                started = time.perf_counter()
                handled = 0
                while handled < BURST:
                    try:
                        frames = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    handle(frames)
                    handled += 1
                if handled and (pending := end_burst(started)) is not None:
                    await pending  # e.g. an fsync before the acknowledgments, off the event loop
                if handled == BURST:
                    await asyncio.sleep(0)  # a backlog must not starve HTTP and signal handling
                    continue
                readable.clear()
                if router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    continue
                await readable.wait()
        finally:
            loop.remove_reader(router.FD)

    def send(self, identity: bytes, frames: list[bytes]) -> int:
        """Send without ever waiting: ZMQ_SENT, ZMQ_AGAIN (the peer's queue is full) or ZMQ_GONE.
        A reply lost this way is covered by the producer's retransmission."""
        router = self._router
        try:
            router.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
            return ZMQ_SENT
        except zmq.Again:
            return ZMQ_AGAIN
        except zmq.ZMQError:
            return ZMQ_GONE
        finally:
            # any operation may consume the descriptor's signal for frames that arrived meanwhile
            # (it is edge-triggered): hand it on, or receive would sleep with frames waiting
            if router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._readable.set()

    async def watch_connections(self) -> None:
        """Count the ZeroMQ port's connections (libzmq's socket monitor). A peer that fails the
        ZMTP handshake (not ZeroMQ at all) or sends a frame over the size cap is disconnected by
        libzmq before any frame reaches the broker; it shows here."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            name = _CONNECTION_EVENTS.get(event["event"])
            if name is None:
                continue
            if name == "handshake_failed" and self.curve:  # with CURVE, any failed handshake is a refusal
                name = "refused"
            self.connections[name] += 1
            if name == "refused":
                reason = REFUSED_UNKNOWN_KEY if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else _REFUSALS.get(event["value"], REFUSED_BAD_HANDSHAKE)
                self.refused[reason] += 1
                if self._throttle.may_log("refused"):
                    log.warning("Broker: refused a ZeroMQ client (%s); %d refused so far", reason.replace("_", " "), self.connections[name])
            elif name == "accept_failed" and self._throttle.may_log(name):
                log.warning("Broker: cannot accept a connection (%s); %d so far", os.strerror(event["value"]), self.connections[name])
            elif name == "handshake_failed" and self._throttle.may_log(name):
                log.warning("Broker: a peer that does not speak ZeroMQ was disconnected; %d so far", self.connections[name])

    def connection_stats(self) -> dict:
        c = self.connections
        return {
            "open": c["accepted"] - c["closed"],
            "accepted": c["accepted"],
            "closed": c["closed"],
            "handshake_failed": c["handshake_failed"],
            "accept_failed": c["accept_failed"],
            "refused": c["refused"],
            "refused_by_reason": dict(self.refused),
        }

    def _stop_authenticator(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def close(self) -> None:
        """Close the monitor and the ROUTER; frames already queued (the goodbyes) get CLOSE_LINGER_MS to leave."""
        if self._monitor is not None:
            self._router.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._router is not None:
            self._router.close(linger=CLOSE_LINGER_MS)
            self._router = None
        self._stop_authenticator()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None
