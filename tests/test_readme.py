"""The README's examples run as written."""

import asyncio
import os
import re
import subprocess
import sys

from helpers import ROOT, publish_numbered, start_broker, wait_until


def readme_python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_consumer_example_runs_as_written(procs):
    example = [block for block in readme_python_blocks() if "Consumer(" in block][0]
    assert len([line for line in example.splitlines() if line.strip()]) <= 10  # "a ten-line consumer example"
    proc, url, _ = start_broker()
    procs.append(proc)
    asyncio.run(publish_numbered(url, 5))
    run = subprocess.Popen([sys.executable, "-c", example.replace("tcp://127.0.0.1:5555", url)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        wait_until(lambda: lines.append(run.stdout.readline().strip()) or len(lines) >= 5, timeout=30, message="5 printed messages")
        assert [int(line.split()[0]) for line in lines] == [0, 1, 2, 3, 4]
        assert lines[0].split(" ", 1)[1] == '{"i":0}'
    finally:
        run.kill()
        run.wait()
