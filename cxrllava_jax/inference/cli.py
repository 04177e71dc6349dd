"""`cxrllava report`, `ask`, `chat` and `complete`: the inference API from a terminal.

    cxrllava report IMAGE_OR_DIR... --checkpoint CKPT [--jsonl OUT [--append|--resume|--overwrite]] [--batch-size N]
    cxrllava report --studies DICOM_DIR... --checkpoint CKPT [--jsonl OUT ...]
    cxrllava ask IMAGE... "Is there a pneumothorax?" --checkpoint CKPT [study options]
    cxrllava chat IMAGE... --checkpoint CKPT [study options]   (/help lists the commands; /quit or Ctrl-D leaves)
    cxrllava complete --checkpoint LLM_CKPT --chat "What is the capital of France?"
    cxrllava complete --checkpoint LLM_CKPT "The capital of France is"

CKPT is our checkpoint or the release's PyTorch directory. Directories expand to the images under them (DICOM
found by content, as PACS exports often have no extension). With `--studies` the directories hold DICOM studies
(`domain.studies.studies_in_folder`: grouped by StudyInstanceUID, ordered by StudyDate): one report per study, each
read with its images' views and the patient's study before it as its prior; its record names the study's UID, its
images (view, date) and the prior's. `ask` and `chat` are about one image or one study (`study_from_arguments`):
several files (views from DICOM's ViewPosition or `--view`, one per file; DICOM files of two StudyInstanceUIDs are
the study and its prior), or a folder of one patient's DICOM studies (the latest, the one before it as its prior);
`--prior` files, `--prior-view`, `--prior-report` and `--indication` as the server's fields of those names.
An image (or study) that cannot be used is recorded with an
"error" field and counted; the others still run. Records are appended one by one under a lock, so a kill keeps
those already written and several processes may share one --jsonl (with --append). `--resume` skips the images
(or studies) that already have a record (a report or an error) in --jsonl, so a killed run continues where it stopped;
`--overwrite` writes a new file beside the old one and replaces it only when the run is done.
`complete` talks to a converted language model alone (`import-torch` of a Hugging Face LLaMA-family directory,
or the LLM inside a CXR-LLaVA checkpoint), so a conversion can be checked before a projector is trained on it.
"""

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path

from tqdm import tqdm

from cxrllava_jax import arguments, files, hub
from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.images import is_dicom_file
from cxrllava_jax.domain.studies import (PriorReportWithoutPrior, Study, given_view, latest_study,
                                         studies_in_folder, study_as_given)
from cxrllava_jax.errors import ConfigError, InputError, UsageError
from cxrllava_jax.inference import compile_cache, sampling
from cxrllava_jax.inference.engine import RELEASE_MAX_NEW_TOKENS, SamplingOptions
from cxrllava_jax.models.configs import DTYPES
from cxrllava_jax.models.quantize import KINDS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def report_main(argv) -> int:
    parser = _parser("report", "write a radiologic report for each image")
    parser.add_argument("images", nargs="+", type=arguments.path, help="image files or directories of them")
    parser.add_argument("--studies", action="store_true", help="the directories hold DICOM studies: one report per "
                        "study (its images grouped by StudyInstanceUID, the patient's earlier study its prior)")
    parser.add_argument("--jsonl", type=arguments.output_file,
                        help='write {"image", "report"} (or "error") lines to this file (its folder is created)')
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--append", action="store_true", help="add to an existing --jsonl file (images already "
                          "in it are written again; say how many)")
    existing.add_argument("--resume", action="store_true", help="add to --jsonl, skipping the images already "
                          "recorded in it (after a killed or failed run)")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --jsonl file (the old one "
                          "is kept until this run is done)")
    parser.add_argument("--batch-size", type=arguments.positive, default=8, help="images decoded together")
    parser.add_argument("--workers", type=arguments.whole_number(0), default=DEFAULT_WORKERS,
                        help="processes that read and preprocess images ahead of the model (0: one at a time, "
                             "in this process, as needed)")
    args = parser.parse_args(argv)
    return _report(args)


def ask_main(argv) -> int:
    parser = _parser("ask", "ask a question about an image or a study")
    add_study_arguments(parser)
    parser.add_argument("question", help="the question, in quotes")
    args = parser.parse_intermixed_args(argv)  # the images and the question, wherever the options come between
    prompting.question_prompt(args.question)  # a question that cannot be asked is refused before the model loads
    options = _options(args)
    study = study_from_arguments(args, args.allow_non_frontal)
    model = _load(args)
    model.ask_question(args.question, study, on_text=_echo, **options)
    print()
    return 0


def chat_main(argv) -> int:
    parser = _parser("chat", "interactive multi-turn chat about an image or a study")
    add_study_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    return _chat(args)


def add_study_arguments(parser: argparse.ArgumentParser):
    """The image or study `ask` and `chat` are about, named as the server's fields are (view, prior, prior_view,
    prior_report, indication)."""
    parser.add_argument("images", nargs="+", type=arguments.input_path, metavar="IMAGE",
                        help="a PNG, JPEG or DICOM file; a study's files (its frontal and lateral views; DICOM files of "
                             "two studies: the study and its prior); or a folder of one patient's DICOM files (its "
                             "latest study, the one before it as its prior)")
    study = parser.add_argument_group("the study", "views and the prior study (DICOM files say their own view and study)")
    study.add_argument("--view", action="append", type=_view, help="the view of each IMAGE, in order (PA, AP, LL, "
                       "...; once per image, or not at all: other images than DICOM read as frontal)")
    study.add_argument("--prior", action="append", type=arguments.input_file, metavar="IMAGE",
                       help="an image of the prior study (once per image)")
    study.add_argument("--prior-view", action="append", type=_view, help="the view of each --prior image, in order")
    study.add_argument("--prior-report", metavar="TEXT", help="the prior study's report")
    study.add_argument("--indication", metavar="TEXT", help="the indication or clinical history")


def _view(text: str) -> str:
    try:
        return given_view(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def study_from_arguments(args, allow_non_frontal: bool = False) -> Study:
    """The study the IMAGE arguments and the study options name, made as the server makes a request's
    (`studies.study_as_given`): one file and nothing else is the release's input; a folder is its latest study
    (`studies.latest_study`). Refused before the model loads, naming the option or the file at fault (a study whose
    only views are lateral too, unless `allow_non_frontal`)."""
    texts = {"prior_report": args.prior_report or "", "indication": args.indication or ""}
    for key, text in texts.items():
        try:
            prompting.check_user_text(text)
        except InputError as error:
            raise InputError(f"--{key.replace('_', '-')}: {error}") from None
    images, views = args.images, args.view
    prior, prior_views = args.prior or [], args.prior_view
    folder = next((path for path in images if path.is_dir()), None)
    if folder is not None:
        if len(images) > 1 or views or prior or prior_views:
            raise UsageError(f"{folder}: a folder is read as one patient's DICOM studies, views and prior from their "
                             "tags; give it alone, without --view, --prior or --prior-view (or give its files)")
        latest = latest_study(folder)
        images, views = [i.source for i in latest.images], [i.view for i in latest.images]
        if latest.prior is not None:
            prior, prior_views = [i.source for i in latest.prior.images], [i.view for i in latest.prior.images]
    for flag, given, named in (("--view", views, images), ("--prior-view", prior_views, prior)):
        if given and len(given) != len(named):
            raise UsageError(f"{flag} is given {len(given)} time(s) for {len(named)} image(s); give it once per "
                             "image, in order, or not at all (DICOM files say their view)")
    try:
        study = study_as_given(images, views, prior, prior_views, **texts)
    except PriorReportWithoutPrior:
        raise UsageError("--prior-report is given but no image of a prior study: give its images with --prior (or "
                         "the DICOM files of the earlier study)") from None
    study.check_views(allow_non_frontal)  # a lateral alone: its tags say so without a decode or a model
    return study


def complete_main(argv) -> int:
    parser = _parser("complete", "continue a text, or answer a chat message, with a converted language model",
                     images=False)
    parser.add_argument("text", help="the text to continue, or with --chat the user's message")
    parser.add_argument("--chat", action="store_true", help="wrap the text in the tokenizer's chat template")
    args = parser.parse_args(argv)

    from cxrllava_jax.inference.language_model import LanguageModel

    options = _options(args)
    compile_cache.enable(args.compilation_cache)
    adapter = None if args.adapter is None else hub.resolve(args.adapter, what="--adapter")
    model = LanguageModel.from_checkpoint(hub.resolve(args.checkpoint, what="--checkpoint"), dtype=args.dtype,
                                          adapter=adapter, chat=args.chat)
    if args.chat:
        print(model.chat([{"role": "user", "content": args.text}], **options))
    else:
        print(args.text + model.complete(args.text, **options))
    return 0


def expand_images(paths) -> list[Path]:
    """Files as given; directories -> the image files under them, sorted: those with an image suffix and DICOM
    files by their content (the preamble and "DICM"), whatever their name."""
    images = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(p)))
            if not found:
                raise InputError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} or DICOM images in this directory")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise InputError(f"{path}: no such image file or directory")
    return images


def _report(args) -> int:
    process, processes = this_process()
    if args.jsonl and processes > 1:  # each process writes its own file
        args.jsonl = args.jsonl.with_name(f"{args.jsonl.stem}.{process:05d}-of-{processes:05d}{args.jsonl.suffix}")
    if args.jsonl:  # before the model loads, so a long run does not end in a refusal
        files.refuse_existing(args.jsonl, args.append or args.resume or args.overwrite,
                              "--append, --resume or --overwrite")
    options = _options(args)
    noun = "study" if args.studies else "image"
    inputs = (expand_studies(args.images) if args.studies else expand_images(args.images))[process::processes]
    if args.jsonl and (args.append or args.resume):
        inputs = _recorded_before(inputs, args.jsonl, skip=args.resume, noun=noun)
        if not inputs:
            return 0
    model = _load(args)
    failed = []
    show_progress = any(p.is_dir() for p in args.images) or len(inputs) > args.batch_size
    writer = (files.record_appender(args.jsonl, replace=args.overwrite, skip_recorded=_recorded if args.resume
                                    else None) if args.jsonl else contextlib.nullcontext())
    with writer as out, tqdm(total=len(inputs), unit=noun, disable=not show_progress, file=sys.stderr) as progress:
        def bad_input(index, error):
            failed.append(inputs[index])
            progress.write(f"cxrllava report: skipped: {error}", file=sys.stderr)
            if out is not None:
                out.write({**_named(inputs[index]), "error": str(error), "provenance": model.provenance})
            progress.update()

        conversations = [[{"role": "user", "content": prompting.REPORT_QUESTION}]] * len(inputs)
        for index, answer in model.iter_generate(conversations, inputs, batch_size=args.batch_size,
                                                 on_bad_image=bad_input, keep=False, workers=args.workers, **options):
            if out is not None:
                out.write({**_named(inputs[index]), "report": answer.text,
                           "provenance": {**model.provenance, **answer.record()}})
            else:
                progress.write(f"== {_shown(inputs[index])} ==\n{answer.text}\n", file=sys.stdout)
            progress.update()
    if failed:
        where = f' (each recorded with an "error" field in {args.jsonl})' if args.jsonl else ""
        print(f"cxrllava report: {len(failed)} of {len(inputs)} {_plural(noun)} failed{where}", file=sys.stderr)
    return 1 if failed else 0


def expand_studies(folders) -> list[Study]:
    """The studies in each folder (`studies_in_folder`), folder by folder."""
    for folder in folders:
        if not folder.is_dir():
            raise InputError(f"{folder}: --studies takes folders of DICOM files; give the folder that holds it")
    return [study for folder in folders for study in studies_in_folder(folder)]


def _named(item) -> dict:
    """The fields of a --jsonl record that say what it is about: the image, or the study's UID, its images with
    their views and date, and the prior's (null when it has none)."""
    if not isinstance(item, Study):
        return {"image": files.printable(item)}

    def described(study: Study) -> dict:
        return {"study": study.uid or None, "date": study.date or None,
                "images": [{"image": files.printable(i.source), "view": i.view or None} for i in study.images]}

    return {**described(item), "prior": item.prior and described(item.prior)}


def _shown(item) -> str:
    if not isinstance(item, Study):
        return files.printable(item)

    def described(study: Study, what: str) -> str:
        named = " ".join(filter(None, (what, study.uid, study.date and f"of {study.date}")))
        return f"{named}: " + ", ".join(f"{files.printable(i.source)} ({i.view or 'view not given'})"
                                        for i in study.images)

    return described(item, "study") + (f"; {described(item.prior, 'prior study')}" if item.prior else "")


def _plural(noun: str) -> str:
    return "studies" if noun == "study" else f"{noun}s"


def _key(named: dict) -> str:
    """What a record is about, alike whether read back from --jsonl or made now: a study's UID (its first image's
    absolute path when it has none), or an image's absolute path (a relative one taken from the current
    directory, so that `images/a.png` and `/data/images/a.png` match)."""
    if "study" in named:
        return "study:" + (named["study"] or os.path.abspath(str(named["images"][0]["image"])))
    return os.path.abspath(str(named["image"]))


def _recorded(record: dict) -> str | None:
    """The key of the image or study a --jsonl record is done with (it holds a report or an error)."""
    if ("report" in record or "error" in record) and ("image" in record or record.get("images")):
        return _key(record)
    return None


def _recorded_before(inputs: list, jsonl: Path, skip: bool, noun: str) -> list:
    """`inputs` (paths or studies) without those already recorded in `jsonl` (with `skip`), or all of them with a
    note of how many will be recorded twice."""
    if not jsonl.exists():
        return inputs
    with files.LockedAppender(jsonl, skip_recorded=_recorded) as existing:
        done = existing.recorded()
    again = {i for i, item in enumerate(inputs) if _key(_named(item)) in done}
    nouns = _plural(noun)
    if skip:
        print(f"cxrllava report: {len(again)} of {len(inputs)} {nouns} already have a record in "
              f"{files.printable(jsonl)}; "
              f"{'nothing to do' if len(again) == len(inputs) else f'writing the other {len(inputs) - len(again)}'}",
              file=sys.stderr)
        return [item for i, item in enumerate(inputs) if i not in again]
    if again:
        print(f"cxrllava report: {len(again)} of {len(inputs)} {nouns} already have a record in "
              f"{files.printable(jsonl)}; --append writes them again (--resume skips them)", file=sys.stderr)
    return inputs


CHAT_COMMANDS = {"/help": "list these commands", "/reset": "forget the conversation so far (same images)",
                 "/quit": "leave (also /exit or Ctrl-D)"}


def _chat(args) -> int:
    options = _options(args)
    study = study_from_arguments(args, args.allow_non_frontal)
    model = _load(args)
    # An unreadable image fails now, not after the first question; the conversation keeps the ids of its turns.
    conversation = model.conversation(study, allow_non_frontal=options.pop("allow_non_frontal"))
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused below instead of ending the chat
        sys.stdin.reconfigure(errors="surrogateescape")
    about = _shown(study.images[0].source if len(study.all_images()) == 1 else study)
    print(f"Chatting about {about}. Type /help for the commands, /quit or Ctrl-D to leave.", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/help":
            print("\n".join(f"  {name:<7} {about}" for name, about in CHAT_COMMANDS.items()))
            continue
        if line == "/reset":
            conversation.reset()
            print("(the conversation is forgotten; the images stay)")
            continue
        if line.startswith("/") and line.split()[0] not in CHAT_COMMANDS:
            print(f"(unknown command {line.split()[0]}; /help lists them)")
            continue
        if not line:
            continue
        answering = _Answering()
        try:  # a turn that cannot be answered is dropped (refused before its answer starts); the session goes on
            prompting.check_user_text(line)
            conversation.ask(line, on_text=answering.show, **options)
        except prompting.PromptTooLongError as error:
            print(f"(the conversation no longer fits the model's context: {error}; type /reset to start anew)")
            continue
        except InputError as error:
            print(f"(not asked: {error})")
            continue
        answering.show("")
        print(flush=True)


class _Answering:
    """Echoes an answer behind its 'cxr-llava> ' prompt, printed with the first text (or an empty answer's end):
    a turn refused while the conversation is encoded prints no answer prompt before its refusal."""

    def __init__(self):
        self.started = False

    def show(self, text: str):
        if not self.started:
            print("cxr-llava> ", end="", flush=True)
            self.started = True
        _echo(text)


def _parser(name: str, description: str, images: bool = True) -> argparse.ArgumentParser:
    parser = arguments.parser(f"cxrllava {name}", description)
    parser.add_argument("--checkpoint", required=True, type=arguments.path,
                        help="our checkpoint directory, the release's PyTorch directory, or a Hub id of either "
                             "(OWNER/NAME[@REVISION])")
    defaults = SamplingOptions()
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling: the probability mass kept")
    parser.add_argument("--max-new-tokens", type=int, default=RELEASE_MAX_NEW_TOKENS,
                        help="at most this many tokens per answer (and never past the context window)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the sampling seed")
    parser.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: the stored weights' "
                        "dtype, computing in float32 on CPU and bfloat16 elsewhere)")
    parser.add_argument("--quantize", choices=KINDS, help="weight-only quantization of the language model")
    parser.add_argument("--compilation-cache", metavar="DIR",
                        help="where compiled programs are kept ('off' to keep none; default: "
                             f"${compile_cache.ENV} or {compile_cache.default_directory()})")
    parser.add_argument("--adapter", type=arguments.path, help="a LoRA adapter (PEFT format; a directory or Hub id) to apply to CKPT")
    if images:
        parser.add_argument("--allow-non-frontal", action="store_true",
                            help="read DICOM files whose tags say they are not frontal chest radiographs (the "
                                 "model was trained on those only)")
    return parser


def _options(args) -> dict:
    """The sampling keywords, range-checked now (before the model loads), and the input guard's override."""
    options = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    try:
        SamplingOptions(**options)
    except sampling.SamplingError as error:  # the same ranges as the API's and the server's, named as flags
        raise ConfigError(f"--{error.option.replace('_', '-')} {error.value}: must be {error.requirement}") from None
    if hasattr(args, "allow_non_frontal"):
        options["allow_non_frontal"] = args.allow_non_frontal
    return options


def this_process() -> tuple[int, int]:
    """(this process's number, how many processes) from JAX's multi-process variables (JAX_PROCESS_ID,
    JAX_NUM_PROCESSES) or, in a SLURM job step (`srun`), SLURM's (SLURM_PROCID, SLURM_NTASKS); (0, 1) when neither is
    set. An `sbatch` script or `salloc` shell has SLURM_NTASKS for its allocation but is one process (as in
    `training.distributed`), so it takes every image. Report processes need no coordinator: each takes every n-th
    image and writes its own file."""
    sets = [("JAX_PROCESS_ID", "JAX_NUM_PROCESSES")]
    if "SLURM_STEP_NODELIST" in os.environ:
        sets.append(("SLURM_PROCID", "SLURM_NTASKS"))
    for number, count in sets:
        if count in os.environ:
            if number not in os.environ and os.environ[count].strip() not in ("0", "1"):  # each would be process 0
                raise ConfigError(f"{count}={os.environ[count]} is set but {number} is not: set it to this process's "
                                  f"number (0 to {count} - 1)")
            try:
                process, processes = int(os.environ.get(number, "0")), int(os.environ[count])
            except ValueError:
                raise ConfigError(f"{number}={os.environ.get(number)!r}, {count}={os.environ[count]!r}: "
                                  "must be whole numbers") from None
            if not 0 <= process < processes:
                raise ConfigError(f"{number}={process} must be in [0, {count}={processes})")
            return process, processes
    return 0, 1


def _load(args):
    from cxrllava_jax.inference.api import CXRLLaVA

    compile_cache.enable(args.compilation_cache)
    adapter = args.adapter and hub.resolve(args.adapter, what="--adapter")
    return CXRLLaVA.from_pretrained(hub.resolve(args.checkpoint, what="--checkpoint"), dtype=args.dtype,
                                    quantize=args.quantize, adapter=adapter)


_echo = functools.partial(print, end="", flush=True)
