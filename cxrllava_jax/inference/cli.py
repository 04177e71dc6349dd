"""`cxrllava report`, `cxrllava ask` and `cxrllava chat`: the inference API from a terminal.

    cxrllava report IMAGE_OR_DIR... --checkpoint CKPT [--jsonl OUT] [--batch-size N]
    cxrllava ask IMAGE "Is there a pneumothorax?" --checkpoint CKPT
    cxrllava chat IMAGE --checkpoint CKPT          (type /exit or press Ctrl-D to leave)

CKPT is our checkpoint or the release's PyTorch directory. Directories expand to the images under them.
"""

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path

from tqdm import tqdm

from cxrllava_jax.domain import prompting
from cxrllava_jax.inference.generate import RELEASE_MAX_NEW_TOKENS, SamplingOptions

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
USER_ERRORS = (FileNotFoundError, ValueError)  # InputError and PromptTooLongError are ValueErrors


def report_main(argv) -> int:
    parser = _parser("report", "write a radiologic report for each image")
    parser.add_argument("images", nargs="+", type=Path, help="image files or directories of them")
    parser.add_argument("--jsonl", type=Path, help='write {"image", "report"} (or "error") lines here')
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    return _run("report", lambda: _report(args))


def ask_main(argv) -> int:
    parser = _parser("ask", "ask a question about an image")
    parser.add_argument("image", type=Path)
    parser.add_argument("question")
    args = parser.parse_args(argv)

    def ask():
        model = _load(args)
        model.ask_question(args.question, args.image, on_text=_echo, **_options(args))
        print()
        return 0

    return _run("ask", ask)


def chat_main(argv) -> int:
    parser = _parser("chat", "interactive multi-turn chat about an image")
    parser.add_argument("image", type=Path)
    args = parser.parse_args(argv)
    return _run("chat", lambda: _chat(args))


def expand_images(paths) -> list[Path]:
    """Files as given; directories -> the image files under them, sorted."""
    images = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} images in this directory")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or directory")
    return images


def _report(args) -> int:
    paths = expand_images(args.images)
    model = _load(args)
    failed = []
    show_progress = any(p.is_dir() for p in args.images) or len(paths) > args.batch_size
    with (args.jsonl.open("w") if args.jsonl else contextlib.nullcontext()) as out, \
            tqdm(total=len(paths), unit="image", disable=not show_progress, file=sys.stderr) as progress:
        def bad_image(index, error):
            failed.append(paths[index])
            progress.write(f"cxrllava report: skipped: {error}", file=sys.stderr)
            _write(out, {"image": str(paths[index]), "error": str(error)})
            progress.update()

        conversations = [[{"role": "user", "content": prompting.REPORT_PROMPT}]] * len(paths)
        for index, report in model.iter_generate(conversations, paths, batch_size=args.batch_size,
                                                 on_bad_image=bad_image, **_options(args)):
            if out is not None:
                _write(out, {"image": str(paths[index]), "report": report})
            else:
                progress.write(f"== {paths[index]} ==\n{report}\n", file=sys.stdout)
            progress.update()
    return 1 if failed else 0


def _chat(args) -> int:
    model = _load(args)
    model.preprocess(args.image)  # an unreadable image fails now, not after the first question
    options = _options(args)
    print(f"Chatting about {args.image}. Type /exit or press Ctrl-D to leave.", flush=True)
    history = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line == "/exit":
            return 0
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("cxr-llava> ", end="", flush=True)
        try:
            answer = model.chat(history, args.image, on_text=_echo, **options)
        except prompting.PromptTooLongError as error:
            history.pop()
            print(f"\n(the conversation no longer fits the model's context: {error}; type /exit and start anew)")
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": answer})


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"cxrllava {name}", description=description)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="our checkpoint directory or the release's PyTorch directory")
    defaults = SamplingOptions()
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=RELEASE_MAX_NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", help="float32 or bfloat16 (default: float32 on CPU, bfloat16 elsewhere)")
    return parser


def _options(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)


def _load(args):
    from cxrllava_jax.inference.api import CXRLLaVA

    return CXRLLaVA.from_pretrained(args.checkpoint, dtype=args.dtype)


def _run(name: str, command) -> int:
    try:
        return command()
    except USER_ERRORS as error:
        print(f"cxrllava {name}: {error}", file=sys.stderr)
        return 1


def _write(out, record: dict):
    if out is not None:
        out.write(json.dumps(record) + "\n")
        out.flush()


_echo = functools.partial(print, end="", flush=True)
