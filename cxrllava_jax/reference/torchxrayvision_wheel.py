"""The torchxrayvision 1.5.7 wheel: real published label files and the Open-i reports, read as a zip (not installed).

Downloaded once into .cache/wheels; the adapter tests, the labeler's development-set test and its benchmark read it.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "torchxrayvision==1.5.7"
WHEEL_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "wheels"  # in the repository checkout


def torchxrayvision_data():
    """name -> bytes of torchxrayvision/data/NAME in the wheel."""
    wheels = sorted(WHEEL_CACHE.glob("torchxrayvision-1.5.7-*.whl"))
    if not wheels:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(WHEEL_CACHE)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL} failed:\n{result.stderr[-2000:]}")
        wheels = sorted(WHEEL_CACHE.glob("torchxrayvision-1.5.7-*.whl"))
    archive = zipfile.ZipFile(wheels[0])
    return lambda name: archive.read(f"torchxrayvision/data/{name}")
