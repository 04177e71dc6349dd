"""How many XLA programs this process has compiled, or loaded from the persistent compilation cache, and the
seconds that took. `/health` reports it: a request that waited for a new batch shape's program is slow for a
reason a client (the serving benchmark's warm-up) can see, and a server that keeps compiling is misconfigured."""

import functools
import threading

import jax

# JAX's monitoring events for an XLA compile and for a program loaded from the persistent cache.
_EVENTS = {"/jax/core/compile/backend_compile_duration": "compiled",
           "/jax/compilation_cache/cache_retrieval_time_sec": "loaded"}


@functools.cache
def counter() -> "_Counter":
    """The process's one counter (JAX's listeners are process-wide and cannot be removed)."""
    counts = _Counter()
    jax.monitoring.register_event_duration_secs_listener(counts.record)
    return counts


class _Counter:
    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {"programs_compiled": 0, "programs_loaded": 0, "program_seconds": 0.0}

    def record(self, event: str, duration: float, **metadata):
        if (kind := _EVENTS.get(event)) is not None:
            with self._lock:
                self._counts[f"programs_{kind}"] += 1
                self._counts["program_seconds"] += duration

    def stats(self) -> dict:
        with self._lock:
            return {**self._counts, "program_seconds": round(self._counts["program_seconds"], 3)}
