"""JAX's persistent compilation cache, on by default for inference: a second `cxrllava report` on the same
machine loads its compiled programs instead of compiling them again.

The directory is `$CXRLLAVA_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/cxrllava-jax/xla` (`~/.cache/...`);
the value `off` turns it off. A directory the user already gave JAX (`JAX_COMPILATION_CACHE_DIR`) wins.
"""

import os
from pathlib import Path

import jax

ENV = "CXRLLAVA_COMPILATION_CACHE"


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxrllava-jax" / "xla"


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Points JAX's compilation cache at `directory` (or the default above); returns it, or None when off."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    choice = str(directory) if directory is not None else os.environ.get(ENV, "")
    if choice == "off":
        return None
    path = Path(choice) if choice else default_directory()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
