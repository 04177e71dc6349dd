"""Prompts and the LLaMA-2 chat format, exactly as the release uses them (REFERENCE.md), and their tokens.

A conversation is a list of {"role": "user"|"assistant", "content": str}; the first user turn carries
`<image>`. Two encodings, each the one the released model met:
- generation prompts (`encode_prompt`) follow the release's inference code: the chat template rendered as text
  (`<s>[INST] <<SYS>>...`), split at `<image>`, each chunk tokenized with `tokenizer(chunk).input_ids`
  (LLaVA's `tokenizer_image_token`). The tokenizer adds BOS and the text's `<s>` stays, so a prompt starts with
  two BOS ids; that is what the release feeds its model, so we do too.
- training conversations (`encode_conversation`) follow LLaVA's LLaMA-2 conversation format, which the released
  model was trained with: the same text without its leading `<s>` (LLaVA strips it), so one BOS; the tokens of
  each assistant answer and its `</s>` are the ones scored. LLaVA finds those tokens by token-count arithmetic
  that is off by a token or two at turn boundaries (its "tokenization mismatch" warnings); we mark exactly the
  answer's tokens instead.
"""

from typing import Sequence

import numpy as np

from cxrllava_jax.domain.radiograph_guard import is_lateral
from cxrllava_jax.errors import InputError

SYSTEM_PROMPT = ("You are a helpful radiologist. Try to interpret chest x ray image and answer to the question "
                 "that user provides.")
IMAGE = "<image>"
REPORT_QUESTION = ("Write a radiologic report on the given chest radiograph, including information about "
                   "atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and pneumothorax.\n")
REPORT_PROMPT = f"{IMAGE}\n{REPORT_QUESTION}"
# A study's report (`study_prompt`): the current films against the prior, each finding's change said.
COMPARISON_QUESTION = ("Write a radiologic report on the current study, comparing it with the prior study: say for "
                       "each finding whether it is new, resolved, increased, decreased or unchanged.\n")
DIFFERENTIAL_QUESTION = "What are the possible differential diagnoses for this patient?\n"
DIFFERENTIAL_PROMPT = f"{IMAGE}\n{DIFFERENTIAL_QUESTION}"
# The paper's label-generation prompt (Figure 2b) is not published; this one asks for the same 14 binary
# labels as a JSON object, which evaluation.json_labels reads.
LABEL_PROMPT = (f"{IMAGE}\nFor each of the following findings, answer 1 if it is present on the chest radiograph "
                "and 0 if it is not, as a JSON object with the findings as keys: No Finding, Enlarged "
                "Cardiomediastinum, Cardiomegaly, Lung Lesion, Lung Opacity, Edema, Consolidation, Pneumonia, "
                "Atelectasis, Pneumothorax, Pleural Effusion, Pleural Other, Fracture, Support Devices.\n")
LLAMA2_MARKERS = ("<s>", "</s>")  # BOS and EOS as the chat template writes them, LLaMA-2's tokens


def question_prompt(question: str) -> str:
    return f"{IMAGE}\n{checked_question(question)}"


def checked_question(question: str) -> str:
    """A question a person asked, refused when it is empty or cannot go into a prompt (`check_user_text`)."""
    if not question.strip():
        raise InputError("the question is empty")
    check_user_text(question)
    return question


def study_prompt(question: str, views: Sequence[str], prior_views: Sequence[str] = (), prior_date: str = "",
                 prior_report: str = "", indication: str = "", date: str = "") -> str:
    """The first user turn about a study: one `<image>` per image, current images (in `views` order) then the
    prior's, each named by its view; the prior's date and report and the indication as text; then `question`.

    One image with nothing else to say (no prior, no indication) is the release's prompt, `<image>\n{question}`,
    whatever its view: a single frontal film reads exactly as the released model was trained to read it."""
    for text in (question, prior_report, indication):
        check_user_text(text)
    if len(views) == 1 and not prior_views and not prior_report and not indication:
        return f"{IMAGE}\n{question}"
    lines = [f"Indication: {' '.join(indication.split())}"] if indication.strip() else []
    lines.append(f"Current study{_dated(date)}:")
    lines += [f"{_view_name(view)} {IMAGE}" for view in views]
    if prior_views or prior_report:
        lines.append(f"Prior study{_dated(prior_date)}:")
        lines += [f"{_view_name(view)} {IMAGE}" for view in prior_views]
    if prior_report.strip():
        lines.append(f"Prior report: {' '.join(prior_report.split())}")
    return "\n".join(lines) + f"\n{question}"


def _view_name(view: str) -> str:
    """'PA view', 'AP view', 'lateral view', or 'frontal view' for an image whose view nobody gave."""
    return f"{'lateral' if is_lateral(view) else (view.strip().upper() or 'frontal')} view"


def _dated(date: str) -> str:
    """', 2024-01-05' for DICOM's '20240105' (any other text as given), '' for none."""
    date = date.strip()
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    return f", {date}" if date else ""


def check_user_text(text: str):
    """Refuses text a person typed that cannot go into a prompt: bytes that were not UTF-8 (a terminal or a file in
    Latin-1 arrives with them as lone surrogates), and `<image>`, which marks where the image features go (a second
    one would put them into the prompt twice)."""
    bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:
        raise InputError(f"the text is not UTF-8 (a byte {_escaped_byte(text[bad])} at character {bad + 1}); type it "
                         f"again or set the terminal to UTF-8: {text[:bad]!r}...")
    if IMAGE in text:
        raise InputError(f"the text contains {IMAGE}, which marks the image's place in the prompt; "
                         f"the image is added for you, so remove it: {text[:80]!r}")


def _escaped_byte(character: str) -> str:
    """The byte a lone surrogate stands for (Python's surrogateescape maps byte b to U+DC00 + b)."""
    code = ord(character)
    return f"{code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"


class PromptTooLongError(InputError):
    pass


def chat_text(turns: Sequence[dict], system: str = SYSTEM_PROMPT, markers: tuple[str, str] = LLAMA2_MARKERS) -> str:
    """The LLaMA-2 chat string: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>...`.

    `markers` are the tokenizer's BOS and EOS texts (the template's `bos_token`/`eos_token`): `<s>`/`</s>` for
    LLaMA-2, a BPE model's own for other LLaMA-family models, so that answers end with the EOS it stops at."""
    return "".join(text for text, _ in _pieces(turns, system, markers))


def markers_of(tokenizer) -> tuple[str, str]:
    return tokenizer.bos_token or "", tokenizer.eos_token


def _pieces(turns: Sequence[dict], system: str, markers: tuple[str, str]):
    """(text, is_answer) pieces of the chat string, BOS/EOS included as text."""
    _check_roles(turns)
    bos, eos = markers
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 else ""
            yield f"{bos}[INST] {sys_block}{turn['content'].strip()} [/INST]", False
        else:
            yield f" {turn['content'].strip()} {eos}", True


def _check_roles(turns: Sequence[dict]):
    roles = [t["role"] for t in turns]
    expected = ["user", "assistant"] * (len(roles) // 2 + 1)
    if not roles or roles != expected[:len(roles)]:
        raise InputError(f"a conversation alternates user/assistant turns starting with user; got {roles}")
    if any(IMAGE in t["content"] for t in turns[1:]):
        raise InputError(f"only the first user turn may carry {IMAGE}")


def count_images(turns: Sequence[dict]) -> int:
    """How many `<image>` places a conversation has (all in its first user turn)."""
    return turns[0]["content"].count(IMAGE) if turns else 0


def check_image_count(turns: Sequence[dict], images: int, origin="the conversation"):
    """Each image needs its `<image>` place and each place its image."""
    places = count_images(turns)
    if places != images:
        raise InputError(f"{origin}: {places} {IMAGE} place(s) in the first user turn for {images} image(s); "
                         "give one per image, in the images' order")


def check_image_ids(ids: np.ndarray, images: int, num_image_tokens: int, image_token_id: int):
    """`check_image_count` on a prompt's ids, where each `<image>` is `num_image_tokens` copies of `image_token_id`
    (what the engine checks of every request, whoever encoded it)."""
    positions = np.count_nonzero(np.asarray(ids) == image_token_id)
    if positions != images * num_image_tokens:
        raise InputError(f"the prompt has {positions} image positions for {images} image(s) of {num_image_tokens} "
                         "positions each")


def tokenize_with_images(text: str, tokenizer, num_image_tokens: int, image_token_id: int) -> list[int]:
    """LLaVA's `tokenizer_image_token`, the release's: `tokenizer(chunk).input_ids` per `<image>`-separated chunk,
    the first chunk's BOS kept and the others' dropped; each `<image>` becomes `num_image_tokens` copies of
    `image_token_id` (the release puts one placeholder there and widens it inside the model)."""
    chunks = [tokenizer(chunk)["input_ids"] for chunk in text.split(IMAGE)]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        if i:
            ids += [image_token_id] * num_image_tokens
        ids += chunk[offset:]
    return ids


def encode_conversation(turns: Sequence[dict], tokenizer, num_image_tokens: int, image_token_id: int,
                        system: str = SYSTEM_PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """Training tokens in LLaVA's LLaMA-2 conversation format and a mask that is True on the assistant answers'
    tokens and their `</s>` (what training scores)."""
    ids: list[int] = []
    mask: list[bool] = []
    text = ""
    markers = markers_of(tokenizer)
    # LLaVA strips the text's BOS because the tokenizer adds one; a tokenizer that adds none keeps it.
    adds_bos = tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    for piece, is_answer in _pieces(turns, system, markers):
        text += piece
        trimmed = text.removeprefix(markers[0]) if adds_bos else text
        longer = tokenize_with_images(trimmed, tokenizer, num_image_tokens, image_token_id)
        if longer[:len(ids)] != ids:  # a token across a turn boundary would leave no clean answer span
            raise InputError(f"the tokenizer merges text across the turn boundary before {piece[:40]!r}")
        mask += [is_answer] * (len(longer) - len(ids))
        ids = longer
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def encode_prompt(turns: Sequence[dict], tokenizer, num_image_tokens: int, image_token_id: int,
                  max_length: int | None = None, system: str = SYSTEM_PROMPT) -> np.ndarray:
    """The generation prompt, as the release builds it, for a conversation whose last turn is the user's."""
    if not turns or turns[-1]["role"] != "user":
        raise InputError("the prompt's last turn must be the user's")
    text = chat_text(turns, system, markers_of(tokenizer))
    ids = np.asarray(tokenize_with_images(text, tokenizer, num_image_tokens, image_token_id), np.int32)
    check_fits(len(ids), text.count(IMAGE), num_image_tokens, max_length)
    return ids


def encode_follow_up(kept: np.ndarray, turns: Sequence[dict], tokenizer, num_image_tokens: int, image_token_id: int,
                     max_length: int | None = None, system: str = SYSTEM_PROMPT) -> np.ndarray:
    """The generation prompt of a conversation's next turn, `turns[-1]` (the user's), continuing `kept`: the ids
    the model read and wrote so far (the last prompt, its answer as generated and the answer's EOS). Re-encoding
    an answer's text does not give back the ids the model wrote, so a prompt built from the text would share only
    the first turn with the keys and values kept for the conversation; this one shares all of it. The new turn's
    ids are those `encode_prompt` gives it within the whole conversation."""
    if len(turns) < 3 or turns[-1]["role"] != "user":
        raise InputError("a follow-up continues a conversation with the user's turn")
    markers = markers_of(tokenizer)
    whole, before = (tokenize_with_images(chat_text(part, system, markers), tokenizer, num_image_tokens,
                                          image_token_id) for part in (turns, turns[:-1]))
    if whole[:len(before)] != before:  # a token across the boundary: the new turn has no ids of its own
        raise InputError(f"the tokenizer merges the user's turn {turns[-1]['content'][:40]!r} with the answer before it")
    ids = np.concatenate([np.asarray(kept, np.int32), np.asarray(whole[len(before):], np.int32)])
    check_fits(len(ids), count_images(turns), num_image_tokens, max_length)
    return ids


def check_fits(prompt_tokens: int, images: int, num_image_tokens: int, max_length: int | None):
    """Refuses a prompt that leaves no token to generate (the release writes at most max_length - prompt length
    - 1), naming where its tokens go; `prompt_tokens` may be the image positions alone, to refuse a study before
    any image is read."""
    if max_length is not None and prompt_tokens + 1 >= max_length:
        raise PromptTooLongError(
            f"the prompt is {prompt_tokens} tokens ({images * num_image_tokens} of them image positions"
            f"{f': {images} images x {num_image_tokens}' if images > 1 else ''}) but the model's context is "
            f"{max_length}: nothing would be left to generate"
            + ("; model.projector_pool=2 makes a quarter of the tokens an image" if images > 1 else ""))
