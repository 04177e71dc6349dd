"""The `cxrllava` command: one subcommand per job, each implemented next to the code it drives."""

import importlib
import sys

from cxrllava_jax import errors

# name -> ("module:function", one-line help). Each function takes the remaining argv and parses it itself,
# so a subcommand's flags live beside its implementation and importing this file stays cheap.
COMMANDS = {
    "synth": ("input_pipeline.synthetic:main", "generate the synthetic CXR dataset (MIMIC-CXR-JPG layout)"),
    "preprocess": ("input_pipeline.tfds_builders:preprocess_main",
                   "store a source's images preprocessed (uint8 model pixels) for fast stage-1 input"),
    "refine": ("input_pipeline.refine:main", "refine reports (strip comparisons, history, devices, numbers)"),
    "label": ("cxrllava_jax.evaluation.cli:label_main", "label reports with the CheXpert-style labeler"),
    "reader-study": ("cxrllava_jax.evaluation.cli:reader_study_main", "export/analyse a blinded reader study"),
    "import-torch": ("cxrllava_jax.convert.cli:import_main", "PyTorch safetensors directory -> our checkpoint"),
    "export-torch": ("cxrllava_jax.convert.cli:export_main", "our checkpoint -> PyTorch safetensors directory"),
    "report": ("cxrllava_jax.inference.cli:report_main", "write a radiologic report for each image"),
    "ask": ("cxrllava_jax.inference.cli:ask_main", "ask a question about an image or a study"),
    "chat": ("cxrllava_jax.inference.cli:chat_main", "interactive multi-turn chat about an image or a study"),
    "complete": ("cxrllava_jax.inference.cli:complete_main", "talk to a converted language model alone"),
    "serve": ("cxrllava_jax.serving.cli:serve_main", "an OpenAI-compatible HTTP API and a web page for the model"),
}


def _usage() -> str:
    lines = ["usage: cxrllava COMMAND [ARGS...] [--debug]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs a subcommand; any failure becomes a message on stderr and a non-zero exit (`--debug`: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = errors.debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cxrllava: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    return errors.report_errors(f"cxrllava {name}",
                                lambda: getattr(importlib.import_module(module_name), func_name)(rest), debug)


if __name__ == "__main__":
    sys.exit(main())
