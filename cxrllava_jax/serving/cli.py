"""`cxrllava serve`: the OpenAI-compatible API and the web page for one model.

    cxrllava serve --checkpoint CKPT [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--api-key-file FILE]
                   [--quantize int8|int4] [--cache-mb MB]

Binds to localhost unless --host says otherwise (`--port 0` picks a free port; the first line on stderr names the
one bound); with --api-key-file every /v1 route needs `Authorization: Bearer KEY`. Every number is checked, and
the port bound, before the model loads: a bad setting is one line and exit 1. Stop with Ctrl-C.
"""

import logging
import math
import socket
import sys
from pathlib import Path

from cxrllava_jax import arguments, files, hub
from cxrllava_jax.errors import ConfigError
from cxrllava_jax.inference.prefix_cache import DEFAULT_CACHE_BYTES
from cxrllava_jax.models.configs import DTYPES
from cxrllava_jax.models.quantize import KINDS
from cxrllava_jax.serving.limits import MIB, Limits


def serve_main(argv) -> int:
    parser = arguments.parser("cxrllava serve", "serve the model over HTTP: an OpenAI-compatible API and a web page")
    parser.add_argument("--checkpoint", required=True, type=arguments.path,
                        help="our checkpoint directory, the release's PyTorch directory, or a Hub id of either "
                             "(OWNER/NAME[@REVISION])")
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter (PEFT format; a directory or Hub id) to apply to "
                        "CKPT")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key-file", type=Path, help="a file holding the bearer key clients must send")
    parser.add_argument("--model-name", help="the model id clients pass (default: the checkpoint's directory name)")
    parser.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: the stored weights' "
                        "dtype, computing in float32 on CPU and bfloat16 elsewhere)")
    parser.add_argument("--quantize", choices=KINDS, help="weight-only quantization of the language model")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    parser.add_argument("--cache-mb", type=float, default=DEFAULT_CACHE_BYTES / MIB,
                        help="memory for finished conversations' keys and values and images' features, reused by "
                             "follow-up requests (0: none; default: %(default).0f)")
    defaults = Limits()
    parser.add_argument("--max-image-mb", type=float, default=defaults.max_image_bytes / MIB)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--max-prompt-tokens", type=int, help="default: what fits the model's context")
    parser.add_argument("--max-output-tokens", type=int, default=defaults.max_output_tokens)
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="the access log (one line per request on stderr) and other log lines: key=value text "
                             "or one JSON object per line")
    args = parser.parse_args(argv)
    limits = _limits(args)
    api_key = _read_api_key(args.api_key_file) if args.api_key_file else None
    try:
        listener = socket.create_server((args.host, args.port))
    except OSError as error:
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there ({error})") from error
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"cxrllava serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    if args.cache_mb < 0:
        raise ConfigError(f"--cache-mb {args.cache_mb}: must be >= 0")
    return _serve(args, listener, limits, api_key)


def _serve(args, listener: socket.socket, limits: Limits, api_key: str | None) -> int:
    import uvicorn

    from cxrllava_jax.inference.api import CXRLLaVA
    from cxrllava_jax.serving import observability
    from cxrllava_jax.serving.app import create_app

    adapter = None if args.adapter is None else hub.resolve(args.adapter, what="--adapter")
    model = CXRLLaVA.from_pretrained(hub.resolve(args.checkpoint, what="--checkpoint"), dtype=args.dtype,
                                     quantize=args.quantize, adapter=adapter)
    name = args.model_name or args.checkpoint.resolve().name
    app = create_app(model, name, limits=limits, api_key=api_key, max_batch_size=args.max_batch_size,
                     max_queue=args.max_queue, cache_bytes=int(args.cache_mb * MIB))
    host, port = listener.getsockname()[:2]
    observability.configure_logging(args.log_format)
    started = f"cxrllava serve: model {name!r} at http://{_url_host(host)}:{port}/ (Ctrl-C stops)"
    if args.log_format == "json":  # then every line on stderr is a JSON object
        logging.getLogger("cxrllava.serve").info(started)
    else:
        print(started, file=sys.stderr, flush=True)
    # uvicorn's own warnings and errors go through the handlers configure_logging set (log_config=None).
    uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None)).run(sockets=[listener])
    return 0


def _limits(args) -> Limits:
    """The numeric flags, each refused by name when out of its range, as the server's Limits."""
    ranges = {"--port": (args.port, 0, 65535), "--max-batch-size": (args.max_batch_size, 1, None),
              "--max-queue": (args.max_queue, 1, None), "--max-image-pixels": (args.max_image_pixels, 1, None),
              "--max-prompt-tokens": (args.max_prompt_tokens, 1, None),
              "--max-output-tokens": (args.max_output_tokens, 1, None)}
    for flag, (value, low, high) in ranges.items():
        if value is not None and not (low <= value and (high is None or value <= high)):
            raise ConfigError(f"{flag} {value}: must be " + (f"in {low}..{high}" if high is not None else f">= {low}"))
    if not (math.isfinite(args.max_image_mb) and args.max_image_mb * MIB >= 1):
        raise ConfigError(f"--max-image-mb {args.max_image_mb}: must be a positive size in MiB")
    return Limits(max_image_bytes=int(args.max_image_mb * MIB), max_image_pixels=args.max_image_pixels,
                  max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens)


def _read_api_key(path: Path) -> str:
    try:
        key = files.read_text(path).strip()
    except OSError as error:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({error.strerror})") from error
    if not key:
        raise ConfigError(f"{path}: the API key file is empty")
    return key


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
