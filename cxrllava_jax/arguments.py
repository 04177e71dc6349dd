"""The command line, read the same way by every entry point.

- `parser`: an argparse parser whose help keeps the description's lines, shows each option's default and lists
  `--debug` (which `cli.main` takes out of the arguments before a subcommand parses them).
- `whole_number`: an argparse type with bounds; a value outside them is refused by argparse naming the flag, the
  value and the bounds, before any work.
- `run_absl`: train.py's and eval.py's absl flags. `--help` exits 0 at once (before the entry point's heavy imports)
  and lists the config files with their variants; a config file that refuses a variant, a `--config.KEY` the
  config does not have, or a value of the wrong type, is one line naming the flag.
"""

import argparse
import ast
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable

from cxrllava_jax import errors

DEBUG_HELP = "on failure, show the traceback (also CXRLLAVA_DEBUG=1)"
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and adds `(default: X)` to an option whose help does not say it (an
    option without a default, or a switch that is off, shows none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


def parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser: defaults shown in its help, and `--debug` listed (and accepted)."""
    made = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)
    add_debug(made)
    return made


def add_debug(made: argparse.ArgumentParser):
    made.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def whole_number(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer within [low, high] (either end open when None)."""
    bounds = (f"from {low:,} to {high:,}" if low is not None and high is not None
              else f"at least {low:,}" if low is not None else f"at most {high:,}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number {bounds}")
        return value

    parse.__name__ = "whole number"  # what argparse calls the type in its own messages
    return parse


positive = whole_number(1)


def input_file(text: str) -> Path:
    """An argparse type: an existing file (not a directory), refused by argparse naming the flag and the path."""
    given = path(text)
    if given.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file")
    if not given.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return given


def input_path(text: str) -> Path:
    """An argparse type: an existing file or directory, refused by argparse naming the flag and the path."""
    given = path(text)
    if not given.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return given


def output_file(text: str) -> Path:
    """An argparse type: a file to write (its folder is created when it is written); a directory is refused."""
    given = path(text)
    if given.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give the name of the file to write in it")
    return given


def output_dir(text: str) -> Path:
    """An argparse type: a directory to write into (created when written); an existing file is refused."""
    given = path(text)
    if given.exists() and not given.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a directory")
    return given


def path(text: str) -> Path:
    """An argparse type: a path that is not empty (an empty one would mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


# ---------------------------------------------------------------- absl (train.py, eval.py)

def run_absl(program: str, main: Callable[[list], int | None], configs: tuple[str, ...] = (),
             renamed_keys: dict[str, str] | None = None):
    """`absl.app.run(main)` with failures reported as by `errors.report_errors`, and a `--help` that exits 0
    listing the config files that match the glob patterns `configs` in the entry point's configs/ folder (each
    with its docstring's first sentence, and `FILE:VARIANT` for a config that names its variants in `VARIANTS`).
    `renamed_keys`: old config key -> its new name; a `--config.OLD=` override is refused, naming the new one."""
    from absl import app, flags, logging

    if any(arg in HELP_FLAGS or arg.startswith("--helpfull") for arg in sys.argv[1:]):
        folder = Path(sys.modules["__main__"].__file__).resolve().parent / "configs"
        print(absl_help(flags.FLAGS, [path for pattern in configs for path in sorted(folder.glob(pattern))]))
        sys.exit(0)

    def parse(argv):
        for old, new in (renamed_keys or {}).items():
            if any(arg.split("=", 1)[0] == f"--config.{old}" for arg in argv[1:]):
                raise errors.ConfigError(f"--config.{old}: the key is now config.{new}")
        try:
            parsed = flags.FLAGS(argv)
            if "config" in flags.FLAGS and flags.FLAGS.config is not None:
                flags.FLAGS.config.keys()  # ml_collections keeps a config file's load error until its first use
            return parsed
        except OSError as error:  # the config file could not be loaded
            given = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), "")
            file = given.split(":", 1)[0]
            problem = ("an empty path" if not file else "no such config file" if not Path(file).is_file()
                       else _first_line(error))
            raise errors.ConfigError(f"--config={given}: {problem}; see --help for the configs") from error
        except flags.Error as error:
            cause = _root_cause(error)
            if cause is error:
                raise errors.UsageError(f"{error} (see --help)") from error
            flag = re.match(r"flag (--[^=\s]+=\S*?): ", str(error))  # absl's "flag --NAME=VALUE: ..."
            text = f"{flag.group(1) + ': ' if flag else ''}{_first_line(cause)}"
            raise (type(cause) if isinstance(cause, errors.CXRLLaVAError) else errors.ConfigError)(text) from error
        except (KeyError, AttributeError) as error:
            raise errors.ConfigError(f"a --config.KEY=VALUE override names a key the config does not have: "
                                     f"{str(error).strip(chr(34))}") from error

    def quiet_main(argv):
        # absl.app logs INFO by default: Orbax's hundred lines around each checkpoint. The run's own lines are
        # prints; --debug or --verbosity shows the libraries' logs again.
        if flags.FLAGS["verbosity"].present:
            logging.get_absl_logger().removeFilter(errors.orbax_notes)
        elif not errors.debug_requested():
            logging.set_verbosity(logging.WARNING)
        return main(argv)

    sys.exit(errors.report_errors(program, lambda: app.run(quiet_main, flags_parser=parse), errors.debug_requested()))


def define_absl_flags(required: tuple[str, ...], directory: str):
    """What train.py and eval.py share beside their own flags: `--debug`, the flags they cannot run without, and
    `--DIRECTORY` (their workdir) checked as the flags are parsed: not empty (that would be the current directory)
    and not an existing file."""
    from absl import flags

    flags.DEFINE_bool("debug", False, DEBUG_HELP)
    flags.mark_flags_as_required(list(required))
    flags.register_validator(directory, lambda value: value is None or (bool(value.strip()) and not Path(value).is_file()),
                             f"--{directory} must name a directory (not empty, not an existing file)")


def absl_help(flag_values, configs: list[Path]) -> str:
    main_module = sys.modules["__main__"]
    lines = [(main_module.__doc__ or "").strip(), "", "flags:", flag_values.main_module_help().split("\n", 1)[-1],
             "  --config.KEY=VALUE: override any field of the config (e.g. --config.data.batch_size=32)"]
    if configs:
        lines += ["", "configs:"] + [f"  {name:<30} {about}" for name, about in config_files(configs)]
    return "\n".join(lines)


def config_files(paths: list[Path]) -> list[tuple[str, str]]:
    """(what to pass to --config, the first sentence of its docstring) for each config file; one row per variant
    for a file with a `VARIANTS` tuple. Only those are imported, so the listing stays fast."""
    rows = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)}
        about = " ".join((ast.get_docstring(tree) or "").split())
        about = re.split(r"(?<=[.:])\s|\s\(", about, maxsplit=1)[0].rstrip(":")
        about = about if len(about) <= 90 else about[:89] + "…"
        shown = f"{path.parent.name}/{path.name}"
        if "VARIANTS" in names:
            rows += [(f"{shown}:{variant}", about if i == 0 else "") for i, variant in
                     enumerate(_load(path).VARIANTS)]
        else:
            rows.append((shown, about))
    return rows


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _root_cause(error: BaseException) -> BaseException:
    """The first exception of a chain: what a config file's get_config raised, under absl's and ml_collections'
    re-raises (which paste its traceback into their text)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
