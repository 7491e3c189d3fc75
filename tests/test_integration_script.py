import os
import subprocess
import sys

from helpers import ROOT


def test_integration_script_passes():
    env = {**os.environ, "STREAMER": f"{sys.executable} -m streamer", "PYTHON": sys.executable}
    result = subprocess.run(["bash", "tests/integration.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS:" in result.stdout
