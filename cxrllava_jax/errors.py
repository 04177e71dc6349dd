"""Project-wide error types and how entry points report them, at the bottom of the layering so every package can
raise and catch them.

An expected failure (bad input, a config value out of range, an output that would be replaced, parts that do not
belong together) is a `CXRLLaVAError` whose message names the file, line, key or value at fault and what to do.
`report_errors` runs an entry point's work and turns any failure into one line on stderr and a non-zero exit;
the traceback is shown only with `--debug` (or CXRLLAVA_DEBUG=1).
"""

import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import Callable

EXIT_ERROR = 1  # an expected failure: the message says what to change
EXIT_BUG = 3  # anything else: the message names the exception and asks for --debug
EXIT_INTERRUPTED = 130
MAX_LINES = 8  # of an expected error's message on the command line


class CXRLLaVAError(Exception):
    """An expected failure; the message names what is wrong and where."""


class InputError(CXRLLaVAError, ValueError):
    """A record that cannot be used; the message names the file or row and what is wrong.

    Pipelines and batch commands catch exactly this type to skip, record and count bad items
    (`input_pipeline.pipelines`, `cxrllava report`).
    """


class ConfigError(CXRLLaVAError, ValueError):
    """A setting that cannot work (a config field, an option, a flag), found before any work: names the key and
    the value, e.g. `config.data.batch_size=0`."""


class MismatchError(CXRLLaVAError, ValueError):
    """Parts that do not belong together: a tokenizer and a checkpoint, a config and its parameters, a workdir and
    another stage's config. The message names both sides."""


class UsageError(CXRLLaVAError):
    """Command-line arguments that do not go together."""


class OutputExistsError(CXRLLaVAError, FileExistsError):
    """An output that would replace an existing one; the message names it and the flag that allows it."""


def debug_requested(argv=None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("CXRLLAVA_DEBUG", "") not in ("", "0")


def report_errors(program: str, work: Callable[[], int | None], debug: bool = False) -> int:
    """Runs `work` and returns its exit status; a failure becomes a message on stderr (and, with `debug`, its
    traceback) and a non-zero status. Usage errors (SystemExit from argparse or absl) pass through. Ctrl-C is one
    line and status 130, wherever it lands (see `_interrupts_reach_the_command`)."""
    if not debug:
        import logging

        logging.getLogger("absl").addFilter(orbax_notes)
    try:
        with _interrupts_reach_the_command():
            return work() or 0
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the one place every failure is turned into a message
        if debug:
            traceback.print_exc()
        print(f"{program}: {describe(error, debug)}", file=sys.stderr)
        if not is_expected(error):
            if not debug:
                print(f"{program}: unexpected {type(error).__name__}; rerun with --debug for the traceback and "
                      "report it with the input that caused it", file=sys.stderr)
            return EXIT_BUG
        return EXIT_ERROR


@contextlib.contextmanager
def _interrupts_reach_the_command():
    """A Ctrl-C that lands in a callback Python may not raise from (JAX's garbage-collection hook, a `__del__`) is
    printed as "Exception ignored ... KeyboardInterrupt" and lost, and the command runs on. Such a lost interrupt
    is raised again 50 ms later by an alarm (a system call, so nothing here can be interrupted on the way), by then
    outside the callback."""
    default_hook = sys.unraisablehook

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.05)
        else:
            default_hook(unraisable)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    default_alarm = signal.signal(signal.SIGALRM, interrupt)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, default_alarm)
        sys.unraisablehook = default_hook


def orbax_notes(record) -> bool:
    """False for Orbax's notes about its own workings (INFO, and warnings such as "No jax.Array in
    TypeHandlerRegistry" at every save): a command's user can do nothing with them. Its errors still show."""
    return record.levelno >= 40 or "/orbax/" not in record.pathname


def is_expected(error: BaseException) -> bool:
    return isinstance(error, (CXRLLaVAError, OSError, UnicodeDecodeError))


def describe(error: BaseException, debug: bool = False) -> str:
    """The message of an error, on one line for the unexpected ones (whose text may be pages long); an expected
    one that lists its problems (a conversion's hundreds of missing tensors) shows the first few unless `debug`."""
    if isinstance(error, OSError) and not isinstance(error, CXRLLaVAError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    text = str(error) or type(error).__name__
    if is_expected(error):
        lines = text.splitlines()
        if debug or len(lines) <= MAX_LINES:
            return text
        return "\n".join(lines[:MAX_LINES - 1] + [f"  ... and {len(lines) - MAX_LINES + 1} more lines (--debug shows them)"])
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"{type(error).__name__}: {first[:300]}"
