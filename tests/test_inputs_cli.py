"""The inputs and rough edges a new user hits, through the real commands: boolean flag spellings,
standard input, FIFOs, globs, rows that are all skipped, the separate-broker example, JSON errors."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import click
import pytest
from helpers import ROOT, Proc, get_json, start_broker, start_streamer, summary, wait_until
from test_operations import scrape

CSV = "gpu_id,utilization,hostname\n" + "".join(f"{i},{i % 100},node-{i % 3}\n" for i in range(300))


def run(module, *args, env=None, input=None, timeout=60):
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, input=input, timeout=timeout, env={**os.environ, **(env or {})}
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


# -- flag spellings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["--persistence", "--persistence=true", "--persistence=ON"])
def test_persistence_flag_spellings_on_the_broker(procs, tmp_path, spelling):
    proc, _, http = start_broker(spelling, f"--persistence-dir={tmp_path}")
    procs.append(proc)
    assert "persistence" in get_json(f"{http}/stats/telemetry")[1]


@pytest.mark.parametrize("spelling", ["--persistence=false", "--persistence=0"])
def test_persistence_off_spellings_on_the_broker(procs, tmp_path, spelling):
    proc, _, http = start_broker(spelling, f"--persistence-dir={tmp_path}")
    procs.append(proc)
    assert "persistence" not in get_json(f"{http}/stats/telemetry")[1]
    assert not (tmp_path / "telemetry").exists()


def test_persistence_flag_from_the_environment_on_both_commands(procs, tmp_path, sample_csv):
    proc, http = start_streamer(sample_csv, f"--persistence-dir={tmp_path}", env={"TELEMETRY_STREAMER_PERSISTENCE": "true"})
    procs.append(proc)
    wait_until(lambda: (tmp_path / "telemetry").is_dir())
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    broker_dir = tmp_path / "b"
    proc = Proc("broker", "serve", "--port=0", "--http-port=0", f"--persistence-dir={broker_dir}", env={"TELEMETRY_BROKER_PERSISTENCE": "yes"})
    procs.append(proc)
    proc.wait_for_line(r"HTTP http://")
    assert (broker_dir / "telemetry").is_dir()


def test_bad_boolean_is_a_usage_error_on_both_commands():
    code, _, stderr = run("streamer", "--csv=data/gpu_metrics.csv", "--persistence=maybe")
    assert code == 2 and "'maybe' is not a boolean" in stderr
    code, _, stderr = run("broker", "serve", env={"TELEMETRY_BROKER_PERSISTENCE": "maybe"})
    assert code == 2 and "'maybe' is not a boolean" in stderr


def test_streamer_persistence_true_with_a_separate_broker_is_the_usual_usage_error():
    code, _, stderr = run("streamer", "--csv=data/gpu_metrics.csv", "--persistence=true", "--broker-url=tcp://127.0.0.1:1")
    assert code == 2 and "--persistence belongs to the broker" in stderr


# -- standard input and pipes -----------------------------------------------------------------------


def test_stdin_is_read_once_then_the_streamer_drains_and_exits_0():
    code, _, stderr = run("streamer", "--csv=-", "--broker-port=0", "--http-port=0", "--rate=0", input=CSV.encode())
    assert code == 0, stderr
    figures = summary(stderr)
    assert figures["published"] == figures["broker_accepted"] == 300
    assert "retrying" not in stderr and "end of standard input after 300 records" in stderr


def test_dev_stdin_is_standard_input_too():
    code, _, stderr = run("streamer", "--csv=/dev/stdin", "--broker-port=0", "--http-port=0", "--rate=0", input=CSV.encode())
    assert code == 0 and summary(stderr)["published"] == 300, stderr


def test_stdin_with_several_workers_is_a_usage_error():
    code, _, stderr = run("streamer", "--csv=-", "--workers=2", input=CSV.encode())
    assert code == 2 and "standard input can be read only once: use --workers=1" in stderr


def test_fifo_is_read_once(tmp_path):
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as f:  # blocks until the worker opens it
            f.write(CSV.encode())

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    code, _, stderr = run("streamer", f"--csv={fifo}", "--broker-port=0", "--http-port=0", "--rate=0")
    writer.join(10)
    assert code == 0, stderr
    assert summary(stderr)["published"] == 300 and "retrying" not in stderr


def test_gzip_from_stdin():
    import gzip

    code, _, stderr = run("streamer", "--csv=-", "--broker-port=0", "--http-port=0", "--rate=0", input=gzip.compress(CSV.encode()))
    assert code == 0 and summary(stderr)["published"] == 300, stderr


# -- several files ----------------------------------------------------------------------------------


def test_a_glob_of_three_files_each_with_its_header(procs, tmp_path):
    for name, text in (("a.csv", "x,y\n1,2\n"), ("b.csv", "name;value\nb;3\n"), ("c.csv", "sep=|\nk|v\nc|4\n")):
        (tmp_path / name).write_text(text)
    proc, http = start_streamer(str(tmp_path / "*.csv"), "--rate=0")
    procs.append(proc)
    for name, delimiter in (("a.csv", "',' (sniffed)"), ("b.csv", "';' (sniffed)"), ("c.csv", "'|' (sep= line)")):
        proc.wait_for_line(re.escape(f"{tmp_path / name}: delimiter {delimiter}"))
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] >= 300)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"] >= 300


# -- counting what is skipped -----------------------------------------------------------------------


def test_no_usable_row_is_counted_warned_once_and_backed_off(procs, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1\n2\n3,4,5\n")
    proc, http = start_streamer(str(path), "--rate=0")
    procs.append(proc)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["skipped"].get("field_count", 0) >= 9, timeout=30, message="three passes counted")
    assert get_json(f"{http}/stats/telemetry")[1]["skipped"] == {"field_count": get_json(f"{http}/stats/telemetry")[1]["skipped"]["field_count"]}
    metrics = scrape(http)
    assert metrics[("telemetry_rows_skipped_total", (("reason", "field_count"), ("topic", "telemetry")))] >= 9
    warnings = [line for line in proc.lines if "no usable row" in line]
    assert len(warnings) == 1 and "field_count=3" in warnings[0] and "backoff" in warnings[0]
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


# -- rough edges ------------------------------------------------------------------------------------


def free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_separate_broker_example_works_verbatim(procs):
    readme = open(os.path.join(ROOT, "README.md")).read()
    streamer_line = "telemetry-streamer --csv=data/gpu_metrics.csv --workers=5 --rate=10 --broker-url=tcp://127.0.0.1:5555"
    assert streamer_line in readme
    if not all(free(p) for p in (5555, 8080, 8081)):
        pytest.skip("the example's fixed ports 5555/8080/8081 are in use on this machine")
    # the commands as written, run from this worktree (python -m for the installed entry points)
    broker = Proc("broker", "serve")
    procs.append(broker)
    broker.wait_for_line(r"HTTP http://127.0.0.1:8080")
    streamer = Proc("streamer", *streamer_line.split()[1:])
    procs.append(streamer)
    streamer.wait_for_line(r"Streamer HTTP http://127.0.0.1:8081")
    wait_until(lambda: get_json("http://127.0.0.1:8080/stats/telemetry")[1]["messages"] >= 10)
    streamer.signal(signal.SIGTERM)
    assert streamer.wait() == 0, streamer.output
    broker.signal(signal.SIGTERM)
    assert broker.wait() == 0


def test_streamer_http_errors_are_json(procs, sample_csv):
    broker, url, _ = start_broker()
    procs.append(broker)
    proc = Proc("streamer", f"--csv={sample_csv}", f"--broker-url={url}", "--http-port=0")
    procs.append(proc)
    http = proc.wait_for_line(r"Streamer HTTP (http://\S+)").group(1)
    assert get_json(f"{http}/no/such/path") == (404, {"error": "Not Found", "path": "/no/such/path"})
    request = urllib.request.Request(f"{http}/healthz", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 405 and json.loads(info.value.read())["error"] == "Method Not Allowed"


@pytest.mark.parametrize("how", ["option", "environment"])
def test_start_up_errors_honour_log_format_json(tmp_path, how):
    args, env = [f"--csv={tmp_path}/missing.csv"], {}
    if how == "option":
        args.append("--log-format=json")
    else:
        env["TELEMETRY_STREAMER_LOG_FORMAT"] = "json"
    code, _, stderr = run("streamer", *args, env=env)
    assert code == 1
    entry = json.loads(stderr.strip())
    assert entry["level"] == "error" and "missing.csv" in entry["message"] and "No such file" in entry["message"]
    code, _, stderr = run("broker", "serve", "--log-format=json", "--port=70000")
    assert code == 2 and json.loads(stderr.strip())["level"] == "error"


def test_every_option_has_help_text_and_an_environment_variable():
    from broker.cli import command as broker_command
    from streamer.cli import command as streamer_command

    commands = [("telemetry-streamer", streamer_command)] + [(f"telemetry-broker {n}", c) for n, c in broker_command.commands.items()]
    for name, command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{name} {param.opts[0]} has no help text"
                assert param.envvar, f"{name} {param.opts[0]} has no environment variable"


@pytest.mark.parametrize(
    "module, args, words",
    [
        ("streamer", ["--csv=data/gpu_metrics.csv", "--ack-timeout=0"], "--ack-timeout"),
        ("broker", ["serve", "--ack-timeout=0"], "--ack-timeout"),
        ("broker", ["serve", "--ack-timeout=off"], "cannot be turned off"),
        ("broker", ["serve", "--fsync-interval-ms=0"], "--fsync-interval-ms"),
        ("streamer", ["--csv=data/gpu_metrics.csv", "--delimiter=ab"], "--delimiter"),
        ("streamer", ["--csv=data/gpu_metrics.csv", "--encoding=klingon"], "unknown encoding"),
        ("streamer", ["--csv=data/gpu_metrics.csv", "--comment=##"], "--comment"),
        ("streamer", ["--csv=data/gpu_metrics.csv", "--skip-rows=-1"], "--skip-rows"),
    ],
)
def test_meaningless_values_are_usage_errors(module, args, words):
    code, _, stderr = run(module, *args)
    assert code == 2 and words in stderr and "Traceback" not in stderr


def test_bad_persistence_dir_names_the_real_cause(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = run("broker", "serve", "--port=0", "--http-port=0", "--persistence", f"--persistence-dir={blocker}/data")
    assert code == 1 and f"{blocker} exists and is not a directory" in stderr


def test_utf16_without_bom_is_refused_at_start_with_a_hint(tmp_path):
    path = tmp_path / "u16.csv"
    path.write_bytes("gpu,util\n0,1\n".encode("utf-16-le"))
    code, _, stderr = run("streamer", f"--csv={path}")
    assert code == 1 and "--encoding=utf-16-le" in stderr


def test_several_csv_in_the_environment_are_separated_like_path(tmp_path):
    spaced = tmp_path / "my metrics.csv"
    spaced.write_text("a\n1\n")
    env = {"TELEMETRY_STREAMER_CSV": f"{spaced}{os.pathsep}tests/data/european.csv"}
    code, _, stderr = run("streamer", "--column-type=nosuch=int", env=env)
    assert code == 2 and "my metrics.csv, tests/data/european.csv" in stderr and "Zeitstempel" in stderr


@pytest.mark.parametrize("end", ["writer closes", "SIGTERM while the pipe is open"])
def test_a_live_pipe_streams_rows_as_they_arrive(end):
    """Like `nvidia-smi --format=csv -l 1 | telemetry-streamer --csv=-`: rows are published while
    the writer is still writing (nothing waits for a buffer, a batch or the sniffing sample to
    fill), and a drain does not wait for the pipe."""
    read_end, write_end = os.pipe()
    popen = subprocess.Popen(
        [sys.executable, "-m", "streamer", "--csv=-", "--broker-port=0", "--http-port=0", "--rate=0"],
        cwd=ROOT,
        stdin=read_end,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(read_end)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(popen.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        http = wait_until(lambda: next((m.group(1) for m in map(re.compile(r"HTTP (http://\S+) ").search, list(lines)) if m), None), timeout=30)
        os.write(write_end, b"timestamp, utilization.gpu [%]\n2024/05/14 10:21:03.123, 45 %\n")
        wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] == 1, timeout=20, message="the first row while the pipe is open")
        os.write(write_end, b"2024/05/14 10:21:04.123, 46 %\n")
        wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] == 2, timeout=20, message="the second row")
        if end != "writer closes":
            popen.send_signal(signal.SIGTERM)
            assert popen.wait(30) == 0
    finally:
        os.close(write_end)
        if popen.poll() is None and end != "writer closes":
            popen.kill()
    assert popen.wait(30) == 0
    reader.join(5)
    output = "".join(lines)
    assert summary(output)["published"] == 2 and "Fatal" not in output and "Traceback" not in output


def test_empty_stdin_ends_with_one_error_and_exit_1():
    code, _, stderr = run("streamer", "--csv=-", "--broker-port=0", "--http-port=0", input=b"")
    assert code == 1 and "cannot read standard input (standard input: file is empty)" in stderr and "retrying" not in stderr
