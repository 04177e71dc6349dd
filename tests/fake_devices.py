"""Running a script on 8 fake CPU devices: XLA fixes the device count when JAX starts, so the script runs in a
subprocess and prints one line `REPORT{json}`; the assertions stay in the calling test."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def report_of(script: str, devices: int = 8) -> dict:
    # Backend optimisation level 0: the script's programs are its own and each runs once or twice, so LLVM's
    # optimisation costs more than it saves; what the script compares, it compares within itself.
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])
