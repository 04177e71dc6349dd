"""SIGKILL a running process at a chosen moment (a checkpoint written, records appended), as a crash or an OOM kill
would: the one polling helper the kill-and-resume tests share."""

import signal
import subprocess
import time
from typing import Callable


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
    """Polls `ready()` until it holds, then kills `process` with SIGKILL and waits for it. Fails if `process` ends
    first (it finished before it could be killed) or `ready()` does not hold within `timeout` seconds."""
    deadline = time.time() + timeout
    while not ready() and process.poll() is None:
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log = getattr(process, "log_path", None)
    assert process.returncode == -signal.SIGKILL, (f"the process ended (exit {process.returncode}) before {what}"
                                                   + (f":\n{log.read_text()}" if log else ""))
