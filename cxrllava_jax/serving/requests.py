"""Requests -> generation jobs: OpenAI chat completions, the task endpoints' forms, and what both must pass.

Every refusal is a RequestError naming the field at fault (`messages[1].content[0].image_url`, `max_tokens`).
Sampling follows the release's defaults (temperature 0.2, top-p 0.8, seed 0) where a request says nothing.
"""

import dataclasses
import math

import numpy as np

from cxrllava_jax.domain import prompting
from cxrllava_jax.inference.engine import SamplingOptions
from cxrllava_jax.serving import uploads
from cxrllava_jax.serving.limits import Limits, RequestError
from cxrllava_jax.errors import InputError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TASK_PROMPTS = {"report": prompting.REPORT_PROMPT, "differential_diagnosis": prompting.DIFFERENTIAL_PROMPT}
# OpenAI options the model cannot honour: refused unless they hold their no-op value.
_UNSUPPORTED = {"n": 1, "stop": None, "logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": None,
                "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "response_format": None}


@dataclasses.dataclass(frozen=True)
class Generation:
    """One request's work: the conversation (text turns, the image apart), its image and sampling."""

    turns: list[dict]
    image: uploads.UploadedImage
    image_field: str
    sampling: SamplingOptions
    stream: bool = False
    include_usage: bool = False


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A Generation made ready for the generator: prompt token ids and preprocessed pixels."""

    prompt: np.ndarray
    pixels: np.ndarray


def parse_chat(body, model_id: str, limits: Limits) -> Generation:
    """The JSON body of `POST /v1/chat/completions` -> a Generation."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "model is required (a string; GET /v1/models lists it)", "model")
    if model != model_id:
        raise RequestError(404, f"model {model!r} does not exist; this server serves {model_id!r}", "model",
                           "model_not_found")
    for key, no_op in _UNSUPPORTED.items():
        value = body.get(key, no_op)
        if value != no_op and not (key == "response_format" and isinstance(value, dict)
                                   and value.get("type") == "text"):
            raise RequestError(400, f"{key}={value!r} is not supported by this server", key, "unsupported_parameter")
    turns, image, image_field = _conversation(body.get("messages"), limits)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "stream_options must be an object", "stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Generation(turns, image, image_field, sampling(body, max_tokens, limits), stream,
                      include_usage=stream and bool(options.get("include_usage")))


def parse_task(task: str, fields: dict, files: dict, limits: Limits) -> Generation:
    """A task endpoint's form: `file` (the image) and optional temperature, top_p, max_tokens, seed."""
    if "file" not in files:
        raise RequestError(400, "the form has no 'file' field (the radiograph: PNG, JPEG or DICOM)", "file")
    filename, data = files["file"]
    image = uploads.from_upload(data, filename, "file", limits)
    numbers = {}
    for key, value in fields.items():
        if key not in ("temperature", "top_p", "max_tokens", "seed"):
            raise RequestError(400, f"unknown form field {key!r}; the form takes file, temperature, top_p, "
                                    "max_tokens and seed", key)
        try:
            numbers[key] = float(value) if key in ("temperature", "top_p") else int(value)
        except ValueError:
            raise RequestError(400, f"{key} must be a number, got {value!r}", key) from None
    turns = [{"role": "user", "content": TASK_PROMPTS[task]}]
    return Generation(turns, image, "file", sampling(numbers, numbers.get("max_tokens"), limits))


def sampling(body: dict, max_tokens, limits: Limits) -> SamplingOptions:
    defaults = SamplingOptions()
    temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0)
    if top_p == 0:
        raise RequestError(400, "top_p must be in (0, 1], got 0", "top_p")
    seed = body.get("seed", defaults.seed)
    if seed is None:
        seed = defaults.seed
    if not _is_int(seed) or not 0 <= seed < 2 ** 32:
        raise RequestError(400, f"seed must be an integer in [0, 2**32), got {seed!r}", "seed")
    if max_tokens is None:
        max_tokens = limits.max_output_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    if max_tokens > limits.max_output_tokens:
        raise RequestError(400, f"max_tokens={max_tokens} is more than this server's limit of "
                                f"{limits.max_output_tokens}", "max_tokens")
    return SamplingOptions(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=seed)


def prepare(generation: Generation, model, limits: Limits) -> Prepared:
    """Tokenizes and preprocesses (the CPU work, done before the job queues, so that errors come early)."""
    try:
        prompt = model.encode(generation.turns)
    except prompting.PromptTooLongError as error:
        raise RequestError(400, str(error), "messages", "context_length_exceeded") from error
    except ValueError as error:
        raise RequestError(400, f"messages: {error}", "messages") from error
    if limits.max_prompt_tokens is not None and len(prompt) > limits.max_prompt_tokens:
        raise RequestError(400, f"the prompt is {len(prompt)} tokens; this server accepts at most "
                                f"{limits.max_prompt_tokens}", "messages", "context_length_exceeded")
    try:
        pixels = model.preprocess(generation.image)
    except InputError as error:
        raise RequestError(400, f"{generation.image_field}: {error}", generation.image_field,
                           "invalid_image") from error
    return Prepared(prompt, pixels)


def _conversation(messages, limits: Limits) -> tuple[list[dict], uploads.UploadedImage, str]:
    """OpenAI messages -> text turns and the one image (it belongs to the conversation's first user turn)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    turns, images = [], []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{field} must be an object with role and content", field)
        role = ROLES.get(message.get("role"))
        if role is None:
            raise RequestError(400, f"{field}.role must be one of {sorted(ROLES)}, got {message.get('role')!r}",
                               f"{field}.role")
        if role == "system" and i > 0:
            raise RequestError(400, f"{field}: a system message may only come first", f"{field}.role")
        texts = []
        for j, part in enumerate(_parts(message.get("content"), f"{field}.content")):
            part_field = f"{field}.content[{j}]"
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url" and role == "user":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append((part_field, uploads.from_data_url(url, f"{part_field}.image_url", limits)))
            else:
                raise RequestError(400, f"{part_field}: expected a text part or (in a user message) an image_url "
                                        f"part, got type {part.get('type')!r}", part_field)
        turns.append({"role": role, "content": "\n".join(texts)})
    if len(images) != 1:
        raise RequestError(400, f"the conversation must hold exactly one image (an image_url part with a data: URL "
                                f"of a PNG, JPEG or DICOM chest radiograph); it holds {len(images)}", "messages")
    (field, image), = images
    return turns, image, f"{field}.image_url"


def _parts(content, field: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise RequestError(400, f"{field} must be a string or a list of content parts", field)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestError(400, f"{key} must be a number in [{low:g}, {high:g}], got {value!r}", key)
    return float(value)


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"{key} must be true or false, got {value!r}", key)
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
