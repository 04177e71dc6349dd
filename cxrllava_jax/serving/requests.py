"""Requests -> generation jobs: OpenAI chat completions, the answer endpoints' forms, and what both must pass.

Every refusal is a RequestError naming the field at fault (`messages[1].content[0].image_url`, `max_tokens`).
A JSON body is bounded before any work (`read_json`): UTF-8, nesting depth, the length of number literals, no
lone surrogates in text; then each field is checked for its type and range, a null counting as absent.
Sampling follows the release's defaults (temperature 0.2, top-p 0.8, seed 0) where a request says nothing, and
its ranges are the command line's (`inference.sampling`).
"""

import dataclasses
import json
import re

import numpy as np

from cxrllava_jax.domain import prompting, radiograph_guard
from cxrllava_jax.inference.engine import SamplingOptions
from cxrllava_jax.inference.sampling import SamplingError, shown
from cxrllava_jax.serving import uploads
from cxrllava_jax.serving.limits import Limits, RequestError
from cxrllava_jax.errors import InputError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ANSWER_PROMPTS = {"report": prompting.REPORT_PROMPT, "differential_diagnosis": prompting.DIFFERENTIAL_PROMPT}
# OpenAI options the model cannot honour: refused unless they hold their no-op value.
_UNSUPPORTED = {"n": 1, "stop": None, "logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": None,
                "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "response_format": None}
# OpenAI options that change nothing here (bookkeeping for the caller's side): accepted and ignored.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
            "prompt_cache_key"}
_CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
                "max_completion_tokens", "seed", "allow_non_frontal"}
# Request field -> SamplingOptions field.
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_new_tokens",
                    "max_completion_tokens": "max_new_tokens", "seed": "seed"}
_FORM_FIELDS = ("file", "temperature", "top_p", "max_tokens", "seed", "allow_non_frontal")
MAX_JSON_DEPTH = 16  # a chat request nests 6 deep (body, messages, message, content, part, image_url)
MAX_NUMBER_CHARS = 40  # a number literal longer than this is no option's value (and int() of 5,000 digits is slow)
MAX_FORM_PARTS = 16
MAX_JSON_VALUES = 100_000
# More turns than this cannot fit the release's context of 4,096 tokens (each turn's template takes several).
MAX_MESSAGES = 1024
# A server's client sends the request field where the library's advice (radiograph_guard.OVERRIDE) names a flag.
_OVERRIDE = ("to read it anyway, send allow_non_frontal: true (a JSON body field of /v1/chat/completions, a form "
             "field of the answer endpoints, a query parameter of /v1/preview)")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One request's work: the conversation (text turns, the image apart), its image and sampling."""

    turns: list[dict]
    image: uploads.UploadedImage
    image_field: str
    sampling: SamplingOptions
    stream: bool = False
    include_usage: bool = False
    allow_non_frontal: bool = False  # read an image whose tags say it is not a frontal chest radiograph


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A Generation made ready for the engine: prompt token ids and preprocessed pixels."""

    prompt: np.ndarray
    pixels: np.ndarray


def read_json(body: bytes) -> dict:
    """A request body -> its JSON object, refused (naming the place) when it is not UTF-8 JSON within bounds."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(400, f"the request body is not UTF-8 (byte {error.start:,}: {error.reason})") from None
    # Parsed JSON takes up to ~100 times the bytes of small values ([1,1,...], {}): count them before parsing.
    # Every value but a container's first follows a comma (base64 has none; text is bounded far below this).
    if (values := text.count(",")) > MAX_JSON_VALUES:
        raise RequestError(400, f"the request body holds more than {MAX_JSON_VALUES:,} JSON values ({values:,} "
                                "commas)")
    try:
        value = json.loads(text, parse_int=_bounded(int), parse_float=_bounded(float), parse_constant=_NotJson,
                           object_pairs_hook=_unique_keys)
    except RecursionError:
        path = _deep_path(text)
        raise RequestError(400, f"{path or 'the request body'}: JSON nested more than {MAX_JSON_DEPTH} levels deep",
                           path) from None
    except json.JSONDecodeError as error:
        raise RequestError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise RequestError(400, "the request body must be a JSON object")
    _check_tree(value, "", 0)
    return value


def parse_chat(body: dict, model_id: str, limits: Limits) -> Generation:
    """The JSON object of `POST /v1/chat/completions` (from `read_json`) -> a Generation."""
    body = {key: value for key, value in body.items() if value is not None}  # null means absent, everywhere
    for key in body:
        if key not in _CHAT_FIELDS and key not in _UNSUPPORTED and key not in _IGNORED:
            raise RequestError(400, f"unknown field {shown(key)}; see the README for the fields this server takes",
                               key, "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "model is required (a string; GET /v1/models lists it)", "model")
    if model != model_id:
        raise RequestError(404, f"model {shown(model)} does not exist; this server serves {model_id!r}", "model",
                           "model_not_found")
    for key, no_op in _UNSUPPORTED.items():
        value = body.get(key, no_op)
        if value != no_op and not (key == "response_format" and isinstance(value, dict)
                                   and value.get("type") == "text"):
            raise RequestError(400, f"{key}={shown(value)} is not supported by this server", key,
                               "unsupported_parameter")
    turns, image, image_field = _conversation(body.get("messages"), limits)
    stream = _flag(body, "stream")
    options = body.get("stream_options", {})
    if not isinstance(options, dict):
        raise RequestError(400, "stream_options must be an object", "stream_options")
    given = {key: body[key] for key in _SAMPLING_FIELDS if key in body}
    if "max_completion_tokens" in given:  # OpenAI's newer name for max_tokens
        if given.setdefault("max_tokens", given["max_completion_tokens"]) != given["max_completion_tokens"]:
            raise RequestError(400, "max_tokens and max_completion_tokens disagree; send one of them",
                               "max_completion_tokens")
        del given["max_tokens"]
    return Generation(turns, image, image_field, sampling(given, limits), stream,
                      include_usage=stream and _flag(options, "include_usage", "stream_options."),
                      allow_non_frontal=_flag(body, "allow_non_frontal"))


def parse_answer_form(kind: str, fields: dict, files: dict, limits: Limits) -> Generation:
    """An answer endpoint's form (field -> list of values, file field -> list of (filename, bytes)): exactly one
    `file` (the image) and optional temperature, top_p, max_tokens, seed and allow_non_frontal."""
    for key, values in {**fields, **files}.items():
        if key not in _FORM_FIELDS:
            raise RequestError(400, f"unknown form field {shown(key)}; the form takes {', '.join(_FORM_FIELDS)}", key)
        if len(values) > 1:
            raise RequestError(400, f"the form has {len(values)} {key!r} fields; send exactly one", key)
    if "file" in fields:
        raise RequestError(400, "the form's 'file' field is text, not a file upload (curl -F file=@cxr.dcm)", "file")
    if "file" not in files:
        raise RequestError(400, "the form has no 'file' field (the radiograph: PNG, JPEG or DICOM)", "file")
    (filename, data), = files["file"]
    image = uploads.from_upload(data, filename, "file", limits)
    values = {key: value for key, (value,) in fields.items()}
    numbers = {key: _form_number(key, values[key]) for key in _SAMPLING_FIELDS if key in values}
    turns = [{"role": "user", "content": ANSWER_PROMPTS[kind]}]
    return Generation(turns, image, "file", sampling(numbers, limits),
                      allow_non_frontal=form_flag(values, "allow_non_frontal"))


def form_flag(values, key: str) -> bool:
    """A form field or query parameter that is true or false (1 or 0); absent is false."""
    value = values.get(key, "false").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise RequestError(400, f"{key} must be true or false, got {shown(value)}", key)
    return value in ("true", "1")


def sampling(given: dict, limits: Limits) -> SamplingOptions:
    """Request fields (temperature, top_p, max_tokens or max_completion_tokens, seed; absent ones take the
    defaults) -> SamplingOptions, refused in the request's own words when out of the ranges `inference.sampling`
    sets or past the server's limit of tokens."""
    options = {_SAMPLING_FIELDS[key]: value for key, value in given.items()}
    options.setdefault("max_new_tokens", limits.max_output_tokens)
    fields = {_SAMPLING_FIELDS[key]: key for key in given}  # option -> the request's name for it
    try:
        result = SamplingOptions(**options)
    except SamplingError as error:
        field = fields.get(error.option, error.option)
        raise RequestError(400, f"{field} must be {error.requirement}, got {shown(error.value)}", field) from None
    if result.max_new_tokens > limits.max_output_tokens:
        field = fields.get("max_new_tokens", "max_tokens")
        raise RequestError(400, f"{field}={result.max_new_tokens} is more than this server's limit of "
                                f"{limits.max_output_tokens}", field)
    return result


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
        pixels = model.preprocess(generation.image, generation.allow_non_frontal)
    except InputError as error:
        raise image_refusal(error, generation.image_field) from error
    return Prepared(prompt, pixels)


def image_refusal(error: InputError, field: str) -> RequestError:
    """The loader's refusal of an image, for an HTTP client: its advice names the request field, not a flag."""
    message = str(error)
    if isinstance(error, radiograph_guard.NotFrontalChestError):
        message = message.replace(radiograph_guard.OVERRIDE, _OVERRIDE)
    return RequestError(400, f"{field}: {message}", field, "invalid_image")


def _conversation(messages, limits: Limits) -> tuple[list[dict], uploads.UploadedImage, str]:
    """OpenAI messages -> text turns and the one image (it belongs to the conversation's first user turn)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(400, f"messages holds {len(messages):,} turns; this server takes at most {MAX_MESSAGES:,}",
                           "messages", "context_length_exceeded")
    turns, images, characters = [], [], 0
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{field} must be an object with role and content", field)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(400, f"{field}.role must be one of {sorted(ROLES)}, got {shown(role)}",
                               f"{field}.role")
        role = ROLES[role]
        if role == "system" and i > 0:
            raise RequestError(400, f"{field}: a system message may only come first", f"{field}.role")
        texts = []
        for j, part in enumerate(_parts(message.get("content"), f"{field}.content")):
            part_field = f"{field}.content[{j}]"
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                characters += len(part["text"])
                if characters > limits.max_text_chars:
                    raise RequestError(400, f"{part_field}.text: the conversation's text is longer than this "
                                            f"server's limit of {limits.max_text_chars:,} characters",
                                       f"{part_field}.text", "context_length_exceeded")
            elif part.get("type") == "image_url" and role == "user":
                url = part.get("image_url")
                images.append((part_field, url.get("url") if isinstance(url, dict) else url))
            else:
                raise RequestError(400, f"{part_field}: expected a text part or (in a user message) an image_url "
                                        f"part, got type {shown(part.get('type'))}", part_field)
        turns.append({"role": role, "content": "\n".join(texts)})
    if len(images) != 1:  # counted before any is decoded
        raise RequestError(400, f"the conversation must hold exactly one image (an image_url part with a data: URL "
                                f"of a PNG, JPEG or DICOM chest radiograph); it holds {len(images)}", "messages")
    (field, url), = images
    return turns, uploads.from_data_url(url, f"{field}.image_url", limits), f"{field}.image_url"


def _parts(content, field: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise RequestError(400, f"{field} must be a string or a list of content parts", field)


def _flag(body: dict, key: str, prefix: str = "") -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"{prefix}{key} must be true or false, got {shown(value)}", prefix + key)
    return value


def _form_number(key: str, text: str):
    """A form field's text -> int or float as JSON would read it, within the same bounds."""
    try:
        value = json.loads(text, parse_int=_bounded(int), parse_float=_bounded(float), parse_constant=_NotJson)
    except (json.JSONDecodeError, RecursionError):
        value = text
    if isinstance(value, (_TooLong, _NotJson)) or not isinstance(value, (int, float)):
        raise RequestError(400, f"{key} must be a number, got {shown(text)}", key)
    return value


class _TooLong(str):
    """A number literal past MAX_NUMBER_CHARS, kept unparsed until `_check_tree` names where it stands."""


class _NotJson(str):
    """NaN, Infinity or -Infinity, which Python's parser accepts and JSON does not have."""


def _unique_keys(pairs: list) -> dict:
    """An object whose key appears twice is ambiguous (which max_tokens counts?): refused, not the last taken."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise RequestError(400, f"the key {shown(twice)} appears twice in one JSON object", twice)
    return value


def _bounded(parse):
    return lambda literal: _TooLong(literal) if len(literal) > MAX_NUMBER_CHARS else parse(literal)


def _check_tree(value, path: str, depth: int):
    """Every value of a parsed body within the bounds: depth, number literals, text without lone surrogates."""
    where = path or "the request body"
    if depth > MAX_JSON_DEPTH:
        raise RequestError(400, f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep", path or None)
    if isinstance(value, _TooLong):
        raise RequestError(400, f"{where}: a number of {len(value):,} characters; numbers here have at most "
                                f"{MAX_NUMBER_CHARS}", path or None)
    if isinstance(value, _NotJson):
        raise RequestError(400, f"{where}: {value} is not a JSON number", path or None)
    if isinstance(value, str):
        _check_text(value, where, path)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, f"a key of {where}", path)
            _check_tree(item, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_tree(item, f"{path}[{i}]", depth + 1)


def _check_text(text: str, where: str, path: str):
    if (match := _SURROGATE.search(text)) is not None:
        raise RequestError(400, f"{where}: character {match.start():,} is a lone UTF-16 surrogate "
                                f"({ascii(match[0])}), which is not text", path or None)


_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]')


def _deep_path(text: str) -> str:
    """Where a JSON text too deep for the parser first passes MAX_JSON_DEPTH (`messages[0].content`), read from
    its brackets, keys and commas alone."""
    stack = []  # per open container: [index] for an array, [key, expecting a key] for an object
    for match in _JSON_TOKENS.finditer(text):
        token = match[0]
        if token in "[{":
            if len(stack) > MAX_JSON_DEPTH:
                break
            stack.append([0] if token == "[" else [None, True])
        elif token in "]}":
            if stack:
                stack.pop()
        elif token == ",":
            if stack and len(stack[-1]) == 1:
                stack[-1][0] += 1
            elif stack:
                stack[-1][1] = True
        elif token == ":":
            if stack and len(stack[-1]) == 2:
                stack[-1][1] = False
        elif stack and len(stack[-1]) == 2 and stack[-1][1]:
            try:
                stack[-1][0] = json.loads(token)
            except ValueError:
                stack[-1][0] = "?"
    path = ""
    for entry in stack:
        path += f"[{entry[0]}]" if len(entry) == 1 else (f".{entry[0]}" if path else str(entry[0]))
    return path
