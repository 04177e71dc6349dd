"""Requests -> generation jobs: OpenAI chat completions, the answer endpoints' forms, and what both must pass.

A request reads one study (`domain.studies.Study`): one image as the release did, or several. In a chat request
every image_url part of the user's messages is an image of it, in order; a part may say its `"view"` ("PA", "AP",
"LL", ...; DICOM files say it themselves) and whether it is the prior study's (`"prior": true`). DICOM files of two
StudyInstanceUIDs are the study and its prior by StudyDate. The body's `prior_report` and `indication` are text.
The answer endpoints' forms take the same as fields: `file` (one or more), `view` (none, or one per file),
`prior_file`, `prior_view`, `prior_report`, `indication`.

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
from cxrllava_jax.domain import studies
from cxrllava_jax.domain.studies import Study
from cxrllava_jax.inference.engine import SamplingOptions
from cxrllava_jax.inference.sampling import SamplingError, shown
from cxrllava_jax.serving import uploads
from cxrllava_jax.serving.limits import Limits, RequestError
from cxrllava_jax.errors import InputError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ANSWER_QUESTIONS = {"report": prompting.REPORT_QUESTION, "differential_diagnosis": prompting.DIFFERENTIAL_QUESTION}
# OpenAI options the model cannot honour: refused unless they hold their no-op value.
_UNSUPPORTED = {"n": 1, "stop": None, "logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": None,
                "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "response_format": None}
# OpenAI options that change nothing here (bookkeeping for the caller's side): accepted and ignored.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
            "prompt_cache_key"}
_CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
                "max_completion_tokens", "seed", "allow_non_frontal", "prior_report", "indication"}
_STUDY_TEXTS = ("prior_report", "indication")
_PART_FIELDS = {"type", "image_url", "view", "prior"}  # an image_url part's keys (view and prior: ours)
# Request field -> SamplingOptions field.
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_new_tokens",
                    "max_completion_tokens": "max_new_tokens", "seed": "seed"}
_FORM_FIELDS = ("file", "view", "prior_file", "prior_view", "prior_report", "indication", "temperature", "top_p",
                "max_tokens", "seed", "allow_non_frontal")
_REPEATED_FORM_FIELDS = ("file", "view", "prior_file", "prior_view")
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
class ImagePart:
    """An image of the request's study: the upload, the request field it came in, its view and study."""

    image: uploads.UploadedImage
    field: str
    view: str = ""
    prior: bool = False


@dataclasses.dataclass(frozen=True)
class Generation:
    """One request's work: the conversation (text turns, the images apart), its study's images and texts, and
    sampling."""

    turns: list[dict]
    images: tuple[ImagePart, ...]
    sampling: SamplingOptions
    stream: bool = False
    include_usage: bool = False
    allow_non_frontal: bool = False  # read an image whose tags say it is not a frontal chest radiograph
    prior_report: str = ""
    indication: str = ""

    @property
    def decode_bytes(self) -> int:
        """What decoding the request's images takes at most: they are decoded one after another (`Study.pixels`),
        each image's buffers gone before the next, so the largest one's (`serving.admission` prices it)."""
        return max(part.image.decode_bytes for part in self.images)

    @property
    def largest_field(self) -> str:
        return max(self.images, key=lambda part: part.image.decode_bytes).field


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A Generation made ready for the engine: prompt token ids and preprocessed pixels [images, H, W, C]."""

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
    turns, images, characters = _conversation(body.get("messages"), limits)
    texts = _study_texts(body, limits, characters)
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
    return Generation(turns, images, sampling(given, limits), stream,
                      include_usage=stream and _flag(options, "include_usage", "stream_options."),
                      allow_non_frontal=_flag(body, "allow_non_frontal"), **texts)


def parse_answer_form(kind: str, fields: dict, files: dict, limits: Limits) -> Generation:
    """An answer endpoint's form (field -> list of values, file field -> list of (filename, bytes)): one or more
    `file` (the study's images) with their `view`s (none, or one per file), `prior_file`s with their `prior_view`s,
    `prior_report`, `indication`, and optional temperature, top_p, max_tokens, seed and allow_non_frontal."""
    for key, values in {**fields, **files}.items():
        if key not in _FORM_FIELDS:
            raise RequestError(400, f"unknown form field {shown(key)}; the form takes {', '.join(_FORM_FIELDS)}", key)
        if len(values) > 1 and key not in _REPEATED_FORM_FIELDS:
            raise RequestError(400, f"the form has {len(values)} {key!r} fields; send exactly one", key)
    for key in ("file", "prior_file"):
        if key in fields:
            raise RequestError(400, f"the form's {key!r} field is text, not a file upload (curl -F {key}=@cxr.dcm)",
                               key)
    if "file" not in files:
        raise RequestError(400, "the form has no 'file' field (the radiograph: PNG, JPEG or DICOM)", "file")
    images = []
    for key, views, prior in (("file", "view", False), ("prior_file", "prior_view", True)):
        uploaded = files.get(key, [])
        given = fields.get(views, [])
        if given and len(given) != len(uploaded):
            raise RequestError(400, f"the form has {len(given)} {views!r} field(s) for {len(uploaded)} {key!r} "
                                    f"file(s); send none (DICOM files say their view) or one per file, in order", views)
        for i, (filename, data) in enumerate(uploaded):
            field = f"{key}[{i}]" if len(uploaded) > 1 else key
            view = _view(given[i], views) if given else ""
            images.append(ImagePart(uploads.from_upload(data, filename, field, limits), field, view, prior))
    values = {key: given[0] for key, given in fields.items() if key not in _REPEATED_FORM_FIELDS}
    numbers = {key: _form_number(key, values[key]) for key in _SAMPLING_FIELDS if key in values}
    turns = [{"role": "user", "content": ANSWER_QUESTIONS[kind]}]
    return Generation(turns, tuple(images), sampling(numbers, limits),
                      allow_non_frontal=form_flag(values, "allow_non_frontal"), **_study_texts(values, limits))


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
    """Tokenizes and preprocesses (the CPU work, done before the job queues, so that errors come early): the
    prompt first, so that a study the context cannot hold is refused before any image is decoded."""
    study = _study(generation)
    try:
        prompt = model.encode(generation.turns, study)
    except prompting.PromptTooLongError as error:
        raise RequestError(400, str(error), "messages", "context_length_exceeded") from error
    except ValueError as error:  # InputError among them: text that cannot go into a prompt
        raise RequestError(400, f"messages: {error}", "messages") from error
    if limits.max_prompt_tokens is not None and len(prompt) > limits.max_prompt_tokens:
        raise RequestError(400, f"the prompt is {len(prompt)} tokens; this server accepts at most "
                                f"{limits.max_prompt_tokens}", "messages", "context_length_exceeded")
    try:
        pixels = model.study_pixels(study, generation.allow_non_frontal)
    except InputError as error:
        raise image_refusal(error, _field_of(error, generation)) from error
    return Prepared(prompt, pixels)


def _study(generation: Generation) -> Study:
    """The request's study: its current images (with the prior's, when parts say which), views and texts."""
    current = [part for part in generation.images if not part.prior]
    prior = [part for part in generation.images if part.prior]
    if not current:
        raise RequestError(400, "the study: every image is marked as the prior's; the current study needs at least "
                                "one", "messages")
    for key in ("prior_report", "indication"):
        try:
            prompting.check_user_text(getattr(generation, key))
        except InputError as error:
            raise RequestError(400, f"{key}: {error}", key) from error
    try:
        return studies.study_as_given([p.image for p in current], [p.view for p in current], [p.image for p in prior],
                                      [p.view for p in prior], generation.prior_report, generation.indication)
    except studies.PriorReportWithoutPrior as error:
        raise RequestError(400, "the study: prior_report is given but no image of a prior study: send the prior's "
                                'images too (image parts with "prior": true, prior_file fields, or DICOM files of the '
                                "earlier study)", "prior_report") from error
    except InputError as error:
        raise RequestError(400, f"the study: {error}", _field_of(error, generation)) from error


def _field_of(error: InputError, generation: Generation) -> str:
    """The request field of the image an error is about (`InputError.image`, set by `domain.studies`)."""
    image = getattr(error, "image", None)
    return next((part.field for part in generation.images if part.image is image),
                generation.images[0].field if len(generation.images) == 1 else "messages")


def image_refusal(error: InputError, field: str) -> RequestError:
    """The loader's refusal of an image, for an HTTP client: its advice names the request field, not a flag."""
    message = str(error)
    if isinstance(error, radiograph_guard.NotFrontalChestError):
        message = message.replace(radiograph_guard.OVERRIDE, _OVERRIDE)
    return RequestError(400, f"{field}: {message}", field, "invalid_image")


def _study_texts(given: dict, limits: Limits, characters: int = 0) -> dict:
    """The request's prior_report and indication (absent: ''), text counted with the conversation's `characters`
    against the server's limit before anything is tokenized."""
    texts = {}
    for key in _STUDY_TEXTS:
        text = texts[key] = given.get(key, "")
        if not isinstance(text, str):
            raise RequestError(400, f"{key} must be a string, got {shown(text)}", key)
        characters += len(text)
        if characters > limits.max_text_chars:
            raise RequestError(400, f"{key}: the request's text is longer than this server's limit of "
                                    f"{limits.max_text_chars:,} characters", key, "context_length_exceeded")
    return texts


def _conversation(messages, limits: Limits) -> tuple[list[dict], tuple[ImagePart, ...], int]:
    """OpenAI messages -> text turns, the study's images (they belong to the conversation's first user turn) and
    the number of characters of text."""
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
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(400, f"{part_field}.text must be a string, got {shown(part.get('text'))}",
                                       f"{part_field}.text")
                texts.append(part["text"])
                characters += len(part["text"])
                if characters > limits.max_text_chars:
                    raise RequestError(400, f"{part_field}.text: the conversation's text is longer than this "
                                            f"server's limit of {limits.max_text_chars:,} characters",
                                       f"{part_field}.text", "context_length_exceeded")
            elif part.get("type") == "image_url" and role == "user":
                images.append(_image_part(part, part_field))
            else:
                raise RequestError(400, f"{part_field}: expected a text part or (in a user message) an image_url "
                                        f"part, got type {shown(part.get('type'))}", part_field)
        turns.append({"role": role, "content": "\n".join(texts)})
    if not images:  # counted before any is decoded
        raise RequestError(400, "the conversation holds no image: send the radiograph (or the study's images) as "
                                "image_url parts with data: URLs of PNG, JPEG or DICOM files", "messages")
    if len(images) > MAX_FORM_PARTS:
        raise RequestError(400, f"the conversation holds {len(images)} images; this server reads at most "
                                f"{MAX_FORM_PARTS} in one study", "messages")
    return turns, tuple(ImagePart(uploads.from_data_url(url, f"{field}.image_url", limits), f"{field}.image_url",
                                  view, prior) for field, url, view, prior in images), characters


def _image_part(part: dict, field: str) -> tuple:
    """(field, its data: URL, view, prior) of an image_url part, its own fields checked (no image decoded)."""
    for key in part:
        if key not in _PART_FIELDS:
            raise RequestError(400, f"{field}: unknown key {shown(key)}; an image_url part takes "
                                    f"{', '.join(sorted(_PART_FIELDS))}", f"{field}.{key}")
    url = part.get("image_url")
    prior = _flag(part, "prior", f"{field}.")
    view = _view(part.get("view", ""), f"{field}.view")
    return field, url.get("url") if isinstance(url, dict) else url, view, prior


def _view(value, field: str) -> str:
    """A view as a request gives it: PA, AP, a lateral (LL, RL, LAT, LATERAL), or empty (not given)."""
    if value is None:
        return ""
    try:
        return studies.given_view(value)
    except InputError as error:
        raise RequestError(400, f"{field} {error}", field) from None


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
    # isascii() reads a flag CPython keeps on every str: a data URL's hundreds of kilobytes are not scanned
    if not text.isascii() and (match := _SURROGATE.search(text)) is not None:
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
