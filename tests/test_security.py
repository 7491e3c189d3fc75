"""Issue 15, the authentication half: CURVE on the ZeroMQ port (keygen, the allow-list, refusals,
SIGHUP reload), the HTTP bearer token and HTTPS, on the real commands over real sockets."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import orjson
import pytest
import zmq
import zmq.auth
from helpers import PRODUCER, ROOT, Proc, start_broker, start_streamer, start_streamer_to, summary, wait_until, workers_of

from broker import protocol as p
from broker.curve import ClientKeys

pytestmark = pytest.mark.timeout(120)

SILENCE_MS = 1500  # how long a refused client listens for an answer that must not come


def keygen(directory, name: str) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-m", "broker", "keygen", str(directory), f"--name={name}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return os.path.join(directory, name + ".key"), os.path.join(directory, name + ".key_secret")


@pytest.fixture
def keys(tmp_path):
    """A broker key pair, an allow-list directory with alice in it, and mallory's key outside it."""
    server_public, server_secret = keygen(tmp_path / "server", "broker")
    alice_public, alice_secret = keygen(tmp_path / "alice", "alice")
    _, mallory_secret = keygen(tmp_path / "mallory", "mallory")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    shutil.copy(alice_public, authorized / "alice.key")
    return {
        "server_public": server_public,
        "server_secret": server_secret,
        "authorized": str(authorized),
        "alice": ClientKeys.load(server_public, alice_secret),
        "alice_secret": alice_secret,
        "alice_public": alice_public,
        "mallory": ClientKeys.load(server_public, mallory_secret),
        "mallory_secret": mallory_secret,
        "tmp": tmp_path,
    }


def curve_broker(procs, keys, *args: str):
    proc, zmq_url, http = start_broker(f"--curve-secret-key={keys['server_secret']}", f"--curve-authorized-keys={keys['authorized']}", *args)
    procs.append(proc)
    return proc, zmq_url, http


def http_get(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def stats(http: str, token: str | None = None) -> dict:
    status, _, body = http_get(f"{http}/stats", token)
    assert status == 200, body
    return orjson.loads(body)


class Dealer:
    """A blocking DEALER speaking the protocol by hand, a CURVE client when given keys."""

    def __init__(self, url: str, curve: ClientKeys | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.sock)
        self.sock.connect(url)

    def send(self, frames: list[bytes]) -> bool:
        """Queue frames without waiting: False if they could not even be queued (a DEALER whose
        connection failed its handshake has nowhere to queue them until it reconnects)."""
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def receive(self, timeout_ms: int = 10_000) -> list[bytes] | None:
        if not self.sock.poll(timeout_ms):
            return None
        return self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def publish_frames(first_seq: int, values, producer: bytes = PRODUCER) -> list[bytes]:
    body = b"\n".join(orjson.dumps({"v": v}) for v in values)
    return p.publish_frames(b"telemetry", producer, first_seq, len(values), body)


def test_keygen_writes_a_pair_pyzmq_loads_and_never_overwrites(tmp_path):
    public_file, secret_file = keygen(tmp_path / "keys", "node-1")
    public, secret = zmq.auth.load_certificate(secret_file)
    assert zmq.auth.load_certificate(public_file) == (public, None)
    assert len(public) == len(secret) == 40
    assert zmq.utils.z85.decode(public) == zmq.utils.z85.decode(zmq.curve_public(secret))  # a real pair
    assert os.stat(secret_file).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "keys").st_mode & 0o777 == 0o700
    again = subprocess.run(
        [sys.executable, "-m", "broker", "keygen", str(tmp_path / "keys"), "--name=node-1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert zmq.auth.load_certificate(secret_file) == (public, secret)


def test_a_client_without_an_allowed_key_can_neither_publish_subscribe_nor_acknowledge(procs, keys):
    proc, zmq_url, http = curve_broker(procs, keys)
    started = time.monotonic()
    alice = Dealer(zmq_url, keys["alice"])
    outsiders = [Dealer(zmq_url), Dealer(zmq_url, keys["mallory"])]  # no CURVE at all; a key not allowed
    try:
        assert alice.send(publish_frames(0, ["a0", "a1"]))
        reply = alice.receive()
        assert reply[1] == p.ACK, reply
        assert alice.send(p.consume_frames(b"telemetry", b"billing", 10))
        delivered = alice.receive()
        assert delivered[1] == p.MESSAGE and p.MSG_HEADER.unpack(delivered[4])[0] == 0  # offset 0, not acknowledged yet

        for i, outsider in enumerate(outsiders):
            outsider.send(publish_frames(0, [f"forged-{i}"], producer=bytes([0x40 + i]) * 16))
            outsider.send(p.subscribe_frames(b"telemetry", p.FROM_BEGINNING, 0, 100))
            outsider.send(p.consume_frames(b"telemetry", b"billing", 10))
            outsider.send(p.group_ack_frames(b"telemetry", b"billing", [0, 1]))  # alice's delivery, and the next
        for outsider in outsiders:
            assert outsider.receive(SILENCE_MS) is None  # no ACK, no DELIVER, no MESSAGE

        body = stats(http)
        topic = body["topics"]["telemetry"]
        assert topic["messages"] == 2  # nothing forged got in
        group = topic["groups"]["billing"]
        assert group["committed"] == 0 and group["consumers"] == 1 and group["in_flight"] >= 1  # nobody acknowledged alice's message
        refused = body["connections"]["refused_by_reason"]
        # the keyless one: no_curve, or bad_handshake when it hung up first (it sees the mismatch too)
        assert refused.get("unknown_key", 0) >= 1 and refused.get("no_curve", 0) + refused.get("bad_handshake", 0) >= 1, body["connections"]
        assert body["connections"]["handshake_failed"] == 0  # with CURVE, every failed handshake is a refusal
        assert body["connections"]["refused"] == sum(refused.values())
        _, _, metrics = http_get(f"{http}/metrics")
        assert b'telemetry_connections_refused_total{reason="unknown_key"}' in metrics
        proc.wait_for_line(r"refused a ZeroMQ client")

        assert alice.send(p.group_ack_frames(b"telemetry", b"billing", [0]))  # the member it went to can
        wait_until(lambda: stats(http)["topics"]["telemetry"]["groups"]["billing"]["committed"] >= 1, message="alice's acknowledgment")
        assert alice.send(p.subscribe_frames(b"telemetry", p.FROM_BEGINNING, 0, 100))
        while (frames := alice.receive())[1] != p.DELIVER:
            pass
        assert p.DELIVER_HEADER.unpack(frames[3])[:2] == (0, 2)
    finally:
        for dealer in (alice, *outsiders):
            dealer.close()
    # rate-limited: one line per 10 s however many refusals (the keyless client keeps reconnecting)
    assert proc.output.count("refused a ZeroMQ client") <= 1 + (time.monotonic() - started) // 10


def test_tail_and_the_python_clients_take_their_keys(procs, keys):
    _, zmq_url, http = curve_broker(procs, keys)
    tail_keys = (f"--curve-server-key={keys['server_public']}", f"--curve-client-key={keys['alice_secret']}")
    alice = Dealer(zmq_url, keys["alice"])
    try:
        assert alice.send(publish_frames(0, ["x", "y", "z"]))
        assert alice.receive()[1] == p.ACK
    finally:
        alice.close()
    result = subprocess.run(
        [sys.executable, "-m", "broker", "tail", f"--broker-url={zmq_url}", "--from-beginning", "--count=3", *tail_keys],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["v"] for line in result.stdout.splitlines()] == ["x", "y", "z"]
    # the environment variables work as the options do
    env = {**os.environ, "TELEMETRY_BROKER_CURVE_SERVER_KEY": keys["server_public"], "TELEMETRY_BROKER_CURVE_CLIENT_KEY": keys["alice_secret"]}
    result = subprocess.run(
        [sys.executable, "-m", "broker", "tail", f"--broker-url={zmq_url}", "--group=g", "--count=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["v"] for line in result.stdout.splitlines()] == ["x", "y"]
    # without keys, tail hears nothing (and is counted as refused)
    tail = Proc("broker", "tail", f"--broker-url={zmq_url}", "--from-beginning", "--count=1")
    procs.append(tail)
    wait_until(lambda: stats(http)["connections"]["refused"] >= 1, message="the keyless tail to be refused")
    assert tail.popen.poll() is None and tail.lines == []
    tail.signal(signal.SIGTERM)
    assert tail.wait() == 0 and tail.lines == []


def test_sighup_rereads_the_authorized_keys(procs, keys):
    proc, zmq_url, http = curve_broker(procs, keys)

    def publish_as(curve: ClientKeys, seq: int, timeout_ms: int) -> list[bytes] | None:
        dealer = Dealer(zmq_url, curve)
        try:
            dealer.send(publish_frames(seq, [f"m{seq}"], producer=curve.public[:16]))
            return dealer.receive(timeout_ms)
        finally:
            dealer.close()

    assert publish_as(keys["mallory"], 0, SILENCE_MS) is None
    shutil.copy(keys["mallory_secret"].removesuffix("_secret"), os.path.join(keys["authorized"], "mallory.key"))
    proc.signal(signal.SIGHUP)
    proc.wait_for_line(r"authorized keys reloaded .*: 2 keys \(1 added, 0 removed\)")
    assert publish_as(keys["mallory"], 0, 10_000)[1] == p.ACK  # a new connection with the added key

    os.remove(os.path.join(keys["authorized"], "alice.key"))
    refused_before = stats(http)["connections"]["refused"]
    proc.signal(signal.SIGHUP)
    proc.wait_for_line(r"authorized keys reloaded .*: 1 keys \(0 added, 1 removed\)")
    assert publish_as(keys["alice"], 0, SILENCE_MS) is None  # the removed key is refused
    assert stats(http)["connections"]["refused"] > refused_before
    assert stats(http)["topics"]["telemetry"]["messages"] == 1

    with open(os.path.join(keys["authorized"], "broken.key"), "w") as f:
        f.write("not a key\n")
    proc.signal(signal.SIGHUP)
    proc.wait_for_line(r"authorized keys not reloaded .*broken.key.*keeping the 1 keys")
    assert publish_as(keys["mallory"], 1, 10_000)[1] == p.ACK  # the old set stays in force
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_the_streamer_publishes_with_keys_and_its_embedded_broker_guards_its_port(procs, keys, sample_csv):
    _, zmq_url, http = curve_broker(procs, keys)
    streamer, own_http = start_streamer_to(
        zmq_url, sample_csv, "--rate=200", f"--curve-server-key={keys['server_public']}", f"--curve-client-key={keys['alice_secret']}"
    )
    procs.append(streamer)
    wait_until(lambda: stats(http)["topics"]["telemetry"]["messages"] >= 50, message="the streamer's messages over CURVE")
    streamer.signal(signal.SIGTERM)
    assert streamer.wait() == 0

    # embedded: its own workers (ipc://, a key pair made at start) publish; a keyless peer on its TCP port is refused
    embedded, embedded_http = start_streamer(
        sample_csv, "--rate=200", f"--curve-secret-key={keys['server_secret']}", f"--curve-authorized-keys={keys['authorized']}"
    )
    procs.append(embedded)
    tcp_url = embedded.wait_for_line(r"ZeroMQ (\S+),").group(1)
    wait_until(lambda: stats(embedded_http)["topics"]["telemetry"]["messages"] >= 50, message="the embedded broker's workers over CURVE")
    outsider = Dealer(tcp_url)
    try:
        outsider.send(publish_frames(0, ["forged"]))
        assert outsider.receive(SILENCE_MS) is None
    finally:
        outsider.close()
    wait_until(lambda: stats(embedded_http)["connections"]["refused"] >= 1, message="the refusal counted")
    alice = Dealer(tcp_url, keys["alice"])  # an allowed client on its TCP port
    try:
        assert alice.send(publish_frames(0, ["from-alice"]))
        assert alice.receive()[1] == p.ACK
    finally:
        alice.close()

    # SIGHUP rereads the allow-list; the workers' own key stays allowed (a restarted worker connects anew)
    shutil.copy(keys["mallory_secret"].removesuffix("_secret"), os.path.join(keys["authorized"], "mallory.key"))
    embedded.signal(signal.SIGHUP)
    embedded.wait_for_line(r"authorized keys reloaded .*\(1 added, 0 removed\)")
    mallory = Dealer(tcp_url, keys["mallory"])
    try:
        assert mallory.send(publish_frames(0, ["from-mallory"], producer=b"\x07" * 16))
        assert mallory.receive()[1] == p.ACK
    finally:
        mallory.close()
    (worker,) = workers_of(embedded.pid)
    os.kill(worker, signal.SIGKILL)
    embedded.wait_for_line(r"Worker 0 exited unexpectedly")
    wait_until(lambda: workers_of(embedded.pid) and workers_of(embedded.pid) != [worker], message="the worker restarted")
    published = stats(embedded_http)["workers"]["0"]["published"]
    wait_until(lambda: stats(embedded_http)["workers"]["0"]["published"] > published + 50, message="the restarted worker to publish over CURVE")
    embedded.signal(signal.SIGTERM)
    code = embedded.wait()
    figures = summary(embedded.output)  # the killed worker's unacknowledged messages are lost: exit 1 then
    assert "Drained:" in figures["line"] and code == (1 if figures["unacknowledged"] else 0), figures["line"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--curve-secret-key={server_public}", "--curve-authorized-keys={authorized}"], "has no secret key"),
        (["--curve-secret-key={tmp}/missing.key_secret", "--curve-authorized-keys={authorized}"], "does not exist"),
        (["--curve-secret-key={tmp}/garbage.key", "--curve-authorized-keys={authorized}"], "is not a CURVE key file"),
        (["--curve-secret-key={server_secret}", "--curve-authorized-keys={tmp}/missing"], "does not exist"),
        (["--http-token-file={tmp}/missing-token"], "cannot read token file"),
        (["--http-token-file={tmp}/garbage.key"], "at least 16 printable"),
        (["--http-tls-cert={tmp}/garbage.key", "--http-tls-key={tmp}/garbage.key"], "cannot use TLS certificate"),
    ],
)
def test_bad_key_files_stop_the_start_in_one_line(keys, args, message):
    (keys["tmp"] / "garbage.key").write_text("garbage\n")
    fields = {k: v for k, v in keys.items() if isinstance(v, str | os.PathLike)}
    formatted = [a.format(**fields) for a in args]
    for command in (["broker", "serve", "--port=0", "--http-port=0"], ["streamer", "--csv=data/gpu_metrics.csv", "--broker-port=0", "--http-port=0"]):
        result = subprocess.run([sys.executable, "-m", *command, *formatted], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, (command, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_curve_options_that_belong_together_are_usage_errors(keys):
    for args in (
        ["-m", "broker", "serve", f"--curve-secret-key={keys['server_secret']}"],
        ["-m", "broker", "tail", f"--curve-server-key={keys['server_public']}"],
        ["-m", "streamer", "--csv=data/gpu_metrics.csv", f"--curve-server-key={keys['server_public']}", f"--curve-client-key={keys['alice_secret']}"],
        ["-m", "streamer", "--csv=data/gpu_metrics.csv", "--broker-url=tcp://127.0.0.1:1", f"--curve-secret-key={keys['server_secret']}"],
    ):
        result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


# -- HTTP -------------------------------------------------------------------------------------------

TOKEN = "t0ken-" + "a1b2c3d4e5f6a7b8"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return str(path)


def assert_guarded(http: str, guarded: list[str], open_paths: list[str]) -> None:
    for path in guarded:
        for token in (None, "wrong-" + TOKEN, TOKEN + "x", TOKEN[:-1]):
            status, headers, body = http_get(http + path, token)
            assert status == 401, (path, token, status)
            assert headers["Content-Type"].startswith("application/json") and "error" in orjson.loads(body)
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert http_get(http + path, TOKEN)[0] == 200, path
    for path in open_paths:
        assert http_get(http + path)[0] == 200, path


def test_the_http_token_guards_every_endpoint_but_probes_and_the_page(procs, token_file):
    proc, _, http = start_broker(f"--http-token-file={token_file}")
    procs.append(proc)
    assert_guarded(http, ["/stats", "/stats/telemetry", "/metrics"], ["/healthz", "/readyz", "/", "/console/app.js", "/console/style.css"])
    assert http_get(http + "/stats/nope", TOKEN)[0] == 404
    assert http_get(http + "/nope")[0] == 401  # unknown paths tell nothing either
    for sneaky in ("/console/../stats", "/console/%2e%2e/stats", "//stats", "/healthz/../stats"):
        status, _, body = http_get(http + sneaky)
        assert status in (401, 403, 404) and b'"topics"' not in body, (sneaky, status)
    status, _, _ = http_get(http + "/topics/telemetry/stream")  # the live stream, too
    assert status == 401

    # the streamer's own HTTP (--broker-url), the token from the environment variable
    zmq_url, _ = start_broker_url(procs)
    streamer = Proc(
        "streamer",
        "--csv=data/gpu_metrics.csv",
        f"--broker-url={zmq_url}",
        "--http-port=0",
        "--rate=5",
        env={"TELEMETRY_STREAMER_HTTP_TOKEN_FILE": token_file},
    )
    procs.append(streamer)
    own = streamer.wait_for_line(r"Streamer HTTP (http://\S+) ").group(1)
    assert_guarded(own, ["/stats", "/metrics"], ["/healthz", "/readyz", "/"])
    streamer.signal(signal.SIGTERM)
    assert streamer.wait() == 0


def start_broker_url(procs) -> tuple[str, str]:
    proc, zmq_url, http = start_broker()
    procs.append(proc)
    return zmq_url, http


def self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, PEM files (the `cryptography` library)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "telemetry-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_file, key_file


def test_https_with_a_certificate_and_the_token(procs, tmp_path, token_file, sample_csv):
    cert_file, key_file = self_signed(tmp_path)
    trusted = ssl.create_default_context(cafile=cert_file)
    proc = Proc("broker", "serve", "--port=0", "--http-port=0", f"--http-tls-cert={cert_file}", f"--http-tls-key={key_file}", f"--http-token-file={token_file}")
    procs.append(proc)
    https = proc.wait_for_line(r"HTTP (https://\S+) ").group(1)
    assert http_get(https + "/healthz", context=trusted)[0] == 200
    assert http_get(https + "/stats", context=trusted)[0] == 401
    status, _, body = http_get(https + "/stats", TOKEN, context=trusted)
    assert status == 200 and "telemetry" in orjson.loads(body)["topics"]
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust the certificate
        http_get(https + "/healthz", context=ssl.create_default_context())
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the HTTPS port
        http_get(https.replace("https://", "http://") + "/healthz")

    # the streamer's HTTP too (embedded broker), from the environment variables
    streamer = Proc(
        "streamer",
        f"--csv={sample_csv}",
        "--broker-port=0",
        "--http-port=0",
        env={"TELEMETRY_STREAMER_HTTP_TLS_CERT": cert_file, "TELEMETRY_STREAMER_HTTP_TLS_KEY": key_file},
    )
    procs.append(streamer)
    embedded = streamer.wait_for_line(r"HTTP (https://\S+) ").group(1)
    assert http_get(embedded + "/stats", context=trusted)[0] == 200  # no token asked for: none configured
    streamer.signal(signal.SIGTERM)
    assert streamer.wait() == 0
