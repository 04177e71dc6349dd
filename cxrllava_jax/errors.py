"""Project-wide error types and how entry points report them, at the bottom of the layering so every package can
raise and catch them.

An expected failure (bad input, a config value out of range, an output that would be replaced, parts that do not
belong together) is a `CXRLLaVAError` whose message names the file, line, key or value at fault and what to do.
`report_errors` runs an entry point's work and turns any failure into one line on stderr and a non-zero exit;
the traceback is shown only with `--debug` (or CXRLLAVA_DEBUG=1).
"""

import os
import sys
import traceback
from typing import Callable

EXIT_ERROR = 1  # an expected failure: the message says what to change
EXIT_BUG = 3  # anything else: the message names the exception and asks for --debug
EXIT_INTERRUPTED = 130


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
    traceback) and a non-zero status. Usage errors (SystemExit from argparse or absl) pass through."""
    if not debug:
        import logging

        logging.getLogger("absl").addFilter(_orbax_notes)
    try:
        return work() or 0
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the one place every failure is turned into a message
        if debug:
            traceback.print_exc()
        print(f"{program}: {describe(error)}", file=sys.stderr)
        if not is_expected(error):
            if not debug:
                print(f"{program}: unexpected {type(error).__name__}; rerun with --debug for the traceback and "
                      "report it with the input that caused it", file=sys.stderr)
            return EXIT_BUG
        return EXIT_ERROR


def run_absl(program: str, main: Callable[[list], int | None]):
    """`absl.app.run(main)` for train.py and eval.py, flag parsing included, with failures reported as by
    `report_errors`. An unknown `--config.key` (a KeyError deep in ml_collections) becomes a ConfigError."""
    from absl import app, flags, logging

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            raise UsageError(f"{error} (see --help)") from error
        except (KeyError, AttributeError) as error:
            raise ConfigError(f"a --config.KEY=VALUE override names a key the config does not have: "
                              f"{str(error).strip(chr(34))}") from error

    def quiet_main(argv):
        # absl.app logs INFO by default: Orbax's hundred lines around each checkpoint. The run's own lines are
        # prints; --debug or --verbosity shows the libraries' logs again.
        if flags.FLAGS["verbosity"].present:
            logging.get_absl_logger().removeFilter(_orbax_notes)
        elif not debug_requested():
            logging.set_verbosity(logging.WARNING)
        return main(argv)

    sys.exit(report_errors(program, lambda: app.run(quiet_main, flags_parser=parse), debug_requested()))


def _orbax_notes(record) -> bool:
    """False for Orbax's notes about its own workings (INFO, and warnings such as "No jax.Array in
    TypeHandlerRegistry" at every save): a command's user can do nothing with them. Its errors still show."""
    return record.levelno >= 40 or "/orbax/" not in record.pathname


def is_expected(error: BaseException) -> bool:
    return isinstance(error, (CXRLLaVAError, OSError, UnicodeDecodeError))


def describe(error: BaseException) -> str:
    """The message of an error, on one line for the unexpected ones (whose text may be pages long)."""
    if isinstance(error, OSError) and not isinstance(error, CXRLLaVAError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    text = str(error) or type(error).__name__
    if is_expected(error):
        return text
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"{type(error).__name__}: {first[:300]}"
