"""Driving the real commands in tests: subprocesses on free ports, polled with deadlines."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_tool(name: str) -> str | None:
    """A command-line tool: next to this Python first (a venv's bin/, also when the venv is not on
    PATH, as with `<venv>/bin/python -m pytest`), then on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which(name)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for a process that must come back on the same port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout` seconds.

    A predicate that raises LookupError (a stats key, group or worker that does not
    exist yet) counts as "not yet": the broker creates those entries asynchronously,
    so reading them before they appear is a race, not a failure. The last such error
    is chained to the timeout so a key that never appears is still reported.
    """
    deadline = time.monotonic() + timeout
    missing = None
    while True:
        try:
            value = predicate()
        except LookupError as exc:
            value, missing = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}") from missing
        time.sleep(interval)


class Proc:
    """A module run with -m (or any `argv`), its output collected line by line by a thread."""

    def __init__(self, module: str = "", *args: str, env: dict | None = None, argv: list[str] | None = None, preexec_fn=None):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            argv or [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match:
        regex = re.compile(pattern)

        def found():
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None:
                self._reader.join(2)
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                raise AssertionError(f"process exited ({self.popen.returncode}) before printing {pattern!r}:\n{self.output}")
            return None

        return wait_until(found, timeout, message=f"a line matching {pattern!r}; output so far:\n{self.output}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _started(proc: Proc, pattern: str) -> re.Match:
    """The line that says `proc` is up; a process that never says so is killed, not left behind."""
    try:
        return proc.wait_for_line(pattern)
    except BaseException:
        proc.kill()
        raise


def start_streamer(csv: str, *args: str, env: dict | None = None) -> tuple[Proc, str]:
    """Start telemetry-streamer with its embedded broker on free ports; returns it and its HTTP URL."""
    proc = Proc("streamer", f"--csv={csv}", "--broker-port=0", "--http-port=0", *args, env=env)
    return proc, _started(proc, r"HTTP (http://\S+) ").group(1)


def start_streamer_to(broker_url: str, csv: str, *args: str) -> tuple[Proc, str]:
    """Start telemetry-streamer publishing to a separate broker; returns it and its own HTTP URL
    (/healthz, /readyz, /stats, /metrics) on a free port."""
    proc = Proc("streamer", f"--csv={csv}", f"--broker-url={broker_url}", "--http-port=0", *args)
    return proc, _started(proc, r"Streamer HTTP (http://\S+) ").group(1)


def topic_stats(http: str, topic: str = "telemetry") -> dict:
    """GET /stats/<topic>, which must answer 200."""
    status, body = get_json(f"{http}/stats/{topic}")
    assert status == 200, body
    return body


def start_broker(*args: str) -> tuple[Proc, str, str]:
    """Start telemetry-broker serve on free ports; returns it, its ZeroMQ URL and its HTTP URL."""
    proc = Proc("broker", "serve", "--port=0", "--http-port=0", *args)
    match = _started(proc, r"ZeroMQ (\S+), HTTP (http://\S+) ")
    return proc, match.group(1).rstrip(","), match.group(2)


PRODUCER = b"\x01" * 16  # a fixed producer id for tests that speak the protocol by hand


def dealer_socket(context, zmq_url: str, timeout_ms: int = 10_000):
    """A blocking DEALER connected to the broker, replies awaited at most `timeout_ms`."""
    import zmq

    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, timeout_ms)
    dealer.connect(zmq_url)
    return dealer


@contextlib.contextmanager
def broker_and_dealer(procs: list, *args: str):
    """A standalone broker (killed by the `procs` fixture) and a DEALER connected to it:
    yields (broker Proc, dealer, HTTP URL, ZeroMQ URL)."""
    import zmq

    proc, zmq_url, http = start_broker(*args)
    procs.append(proc)
    ctx = zmq.Context()
    dealer = dealer_socket(ctx, zmq_url)
    try:
        yield proc, dealer, http, zmq_url
    finally:
        dealer.close()
        ctx.term()


def publish(dealer, first_seq: int, values, topic: bytes = b"telemetry", producer: bytes = PRODUCER) -> list[bytes]:
    """Send one PUBLISH of {"v": value} messages and return the broker's reply frames."""
    import orjson

    from broker import protocol as p

    body = b"\n".join(orjson.dumps({"v": v}) for v in values)
    dealer.send_multipart(p.publish_frames(topic, producer, first_seq, len(values), body))
    return dealer.recv_multipart()


async def publish_numbered(url: str, count: int, batch: int = 100, topic: str = "telemetry", pad: int = 0):
    """Publish messages {"i": 0} .. {"i": count - 1} through the client's Publisher, in batches, and
    wait until all are acknowledged; returns the closed Publisher (for its counters)."""
    from broker.client import Publisher

    pub = Publisher(url, topic)
    await pub.start()
    for first in range(0, count, batch):
        n = min(batch, count - first)
        await pub.publish(b"\n".join(orjson.dumps({"i": i, "pad": "x" * pad} if pad else {"i": i}) for i in range(first, first + n)), n)
    assert await pub.flush(30)
    await pub.close()
    return pub


@contextlib.contextmanager
def fake_broker():
    """A test-side ROUTER on a free port playing the broker: it acknowledges only what the test
    acknowledges. Yields (router, its tcp:// URL)."""
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield router, f"tcp://127.0.0.1:{port}"
    finally:
        router.close()
        ctx.term()


def children_of(pid: int) -> list[int]:
    """Live child processes of pid (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def workers_of(pid: int) -> list[int]:
    """The streamer's worker processes: the children of its fork server (or, where workers are
    spawned, its spawned children); not the fork server or multiprocessing's resource tracker."""
    found = []
    for child in children_of(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{child}/comm", "rb") as f:
                name = f.read().strip()
        except FileNotFoundError:
            continue
        if name == b"forkserver" or b"forkserver" in cmdline:  # a fork of the streamer, or a new interpreter
            found += children_of(child)
        elif b"spawn_main" in cmdline:
            found.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone (ProcessLookupError: between open and read)
        return False


def summary(output: str) -> dict:
    """The drain summary line's figures: published, unacknowledged, broker_accepted, per worker."""
    line = [ln for ln in output.splitlines() if "published=" in ln and ("Drained:" in ln or "Forced exit:" in ln)][-1]
    figures = {k: int(v) for k, v in re.findall(r"\b(published|unacknowledged|broker_accepted)=(\d+)", line)}
    figures["workers"] = {int(k): int(v) for k, v in re.findall(r"worker (\d+)=(\d+)", line)}
    figures["line"] = line
    return figures


def dump(directory, *args) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "broker", "dump", f"--persistence-dir={directory}", *args], cwd=ROOT, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def assert_contiguous(records: list[dict]) -> dict[str, list[int]]:
    """Offsets contiguous from the first; each producer's sequence numbers contiguous, no duplicates."""
    offsets = [r["offset"] for r in records]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    seqs = collections.defaultdict(list)
    for r in records:
        seqs[r["producer"]].append(r["seq"])
    for producer, numbers in seqs.items():
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), producer
    return seqs


# -- virtual time: deterministic timing tests, independent of how busy the machine is -------------


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready to run."""

    def __init__(self):
        super().__init__()
        self._now = 0.0

    def time(self):
        return self._now

    def _run_once(self):
        if not self._ready and self._scheduled:
            # a real clock always moves on: at least 1 ns (aiolimiter's float residue can ask for less)
            self._now = max(self._now + 1e-9, self._scheduled[0]._when)
        super()._run_once()


def run_virtual(coro):
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
