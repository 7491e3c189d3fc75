"""The command lines' contract for bad input: one clear line, the right exit code, no traceback."""

import socket
import subprocess
import sys

import pytest
from helpers import ROOT


def run(module, *args, env=None, timeout=30):
    import os

    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return result.returncode, result.stdout, result.stderr


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--workers=0"], "--workers"),
        (["--workers=two"], "--workers"),
        (["--rate=-1"], "--rate"),
        (["--rate=abc"], "--rate"),
        (["--rate=nan"], "--rate"),
        (["--rate=inf"], "--rate"),
        (["--column-type", "active=boolean"], "unknown column type"),
        (["--column-type", "active"], "NAME=TYPE"),
        (["--column-type", "nosuchcolumn=int"], "no column named 'nosuchcolumn'"),
        (["--topic=../etc"], "--topic"),
        (["--broker-url=localhost:5555"], "--broker-url"),
        (["--http-port=70000"], "--http-port"),
        (["--no-such-option"], "no-such-option"),
        (["--max-message-bytes=100"], "less than 128 bytes"),
        (["--max-message-bytes=1XB"], "is not a size"),
        (["--persistence", "--segment-bytes=1KiB"], "less than 4096 bytes"),
    ],
)
def test_bad_options_are_usage_errors(args, words):
    code, _, stderr = run("streamer", "--csv=data/gpu_metrics.csv", *args)
    assert code == 2
    line = one_line_error(stderr)
    assert line.startswith("telemetry-streamer: error:") and words in line


def test_missing_csv_option_is_a_usage_error():
    code, _, stderr = run("streamer")
    assert code == 2 and "--csv" in one_line_error(stderr)


def test_options_come_from_the_environment():
    code, _, stderr = run("streamer", "--csv=data/gpu_metrics.csv", env={"TELEMETRY_STREAMER_WORKERS": "0"})
    assert code == 2 and "--workers" in one_line_error(stderr)


@pytest.mark.parametrize(
    "content, reason",
    [(None, "No such file"), (b"", "file is empty"), (b"a,b\n", "no data rows"), (b"a,a\n1,2\n", "duplicate column")],
)
def test_unusable_csv_is_refused_at_start(tmp_path, content, reason):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_bytes(content)
    code, _, stderr = run("streamer", f"--csv={path}", "--broker-port=0", "--http-port=0")
    assert code == 1
    line = one_line_error(stderr)
    assert str(path) in line and reason in line


def test_directory_as_csv_is_refused(tmp_path):
    code, _, stderr = run("streamer", f"--csv={tmp_path}")
    assert code == 1 and "is a directory" in one_line_error(stderr)


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, stderr = run("streamer", "--csv=data/gpu_metrics.csv", "--broker-port=0", f"--http-port={port}")
        assert code == 1
        assert f"cannot listen for HTTP on 127.0.0.1:{port}" in stderr.strip().splitlines()[-1]
        assert "Traceback" not in stderr
        code, _, stderr = run("broker", "serve", f"--port={port}", "--http-port=0")
        assert code == 1 and f"cannot listen for ZeroMQ on 127.0.0.1:{port}" in stderr.strip().splitlines()[-1]


def test_help_lists_every_option_and_its_environment_variable():
    code, stdout, _ = run("streamer", "--help")
    assert code == 0
    for option in (
        "--csv",
        "--workers",
        "--rate",
        "--topic",
        "--broker-url",
        "--broker-port",
        "--http-host",
        "--http-port",
        "--shutdown-timeout",
        "--column-type",
        "--log-level",
    ):
        assert option in stdout
        assert "TELEMETRY_STREAMER_" + option[2:].upper().replace("-", "_") in stdout
