"""Prompts and the LLaMA-2 chat format, exactly as the release uses them (REFERENCE.md), and their tokens.

A conversation is a list of {"role": "user"|"assistant", "content": str}; the first user turn carries
`<image>`. Tokenisation works piece by piece (BOS, instruction text, image positions, answer, EOS) so
the same function yields the generation prompt and, for training, the mask of answer tokens.
"""

from typing import Sequence

import numpy as np

SYSTEM_PROMPT = ("You are a helpful radiologist. Try to interpret chest x ray image and answer to the question "
                 "that user provides.")
IMAGE = "<image>"
REPORT_PROMPT = (f"{IMAGE}\nWrite a radiologic report on the given chest radiograph, including information about "
                 "atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and pneumothorax.\n")
DIFFERENTIAL_PROMPT = f"{IMAGE}\nWhat are the possible differential diagnoses for this patient?\n"
# The paper's label-generation prompt (Figure 2b) is not published; this one asks for the same 14 binary
# labels as a JSON object, which evaluation.json_labels reads.
LABEL_PROMPT = (f"{IMAGE}\nFor each of the following findings, answer 1 if it is present on the chest radiograph "
                "and 0 if it is not, as a JSON object with the findings as keys: No Finding, Enlarged "
                "Cardiomediastinum, Cardiomegaly, Lung Lesion, Lung Opacity, Edema, Consolidation, Pneumonia, "
                "Atelectasis, Pneumothorax, Pleural Effusion, Pleural Other, Fracture, Support Devices.\n")


def question_prompt(question: str) -> str:
    return f"{IMAGE}\n{question}"


class PromptTooLongError(ValueError):
    pass


def chat_text(turns: Sequence[dict], system: str = SYSTEM_PROMPT) -> str:
    """The LLaMA-2 chat string: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>...`."""
    return "".join(text for text, _ in _pieces(turns, system))


def _pieces(turns: Sequence[dict], system: str):
    """(text, is_answer) pieces of the chat string, `<s>`/`</s>` included as text."""
    _check_roles(turns)
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 else ""
            yield f"<s>[INST] {sys_block}{turn['content'].strip()} [/INST]", False
        else:
            yield f" {turn['content'].strip()} ", True
            yield "</s>", True


def _check_roles(turns: Sequence[dict]):
    roles = [t["role"] for t in turns]
    expected = ["user", "assistant"] * (len(roles) // 2 + 1)
    if not roles or roles != expected[:len(roles)]:
        raise ValueError(f"a conversation alternates user/assistant turns starting with user; got {roles}")
    if any(IMAGE in t["content"] for t in turns[1:]):
        raise ValueError(f"only the first user turn may carry {IMAGE}")


def encode_conversation(turns: Sequence[dict], tokenizer, num_image_tokens: int, image_token_id: int,
                        system: str = SYSTEM_PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a mask that is True on assistant answer tokens and their `</s>` (what training scores).

    `<image>` becomes `num_image_tokens` copies of `image_token_id`; `<s>`/`</s>` become BOS/EOS ids.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_answer in _pieces(turns, system):
        piece = _encode_piece(text, tokenizer, num_image_tokens, image_token_id)
        ids += piece
        mask += [is_answer] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def encode_prompt(turns: Sequence[dict], tokenizer, num_image_tokens: int, image_token_id: int,
                  max_length: int | None = None, system: str = SYSTEM_PROMPT) -> np.ndarray:
    """The generation prompt for a conversation whose last turn is the user's question."""
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the prompt's last turn must be the user's")
    ids, _ = encode_conversation(turns, tokenizer, num_image_tokens, image_token_id, system)
    # The release writes at most max_length - prompt length - 1 tokens: at least one must fit.
    if max_length is not None and len(ids) + 1 >= max_length:
        raise PromptTooLongError(
            f"the prompt is {len(ids)} tokens ({num_image_tokens} of them image positions) but the model's "
            f"context is {max_length}: nothing would be left to generate")
    return ids


def _encode_piece(text: str, tokenizer, num_image_tokens: int, image_token_id: int) -> list[int]:
    if text == "</s>":
        return [tokenizer.eos_token_id]
    ids: list[int] = []
    if text.startswith("<s>"):
        ids.append(tokenizer.bos_token_id)
        text = text[len("<s>"):]
    chunks = text.split(IMAGE)
    for i, chunk in enumerate(chunks):
        if i:
            ids += [image_token_id] * num_image_tokens
        if chunk:
            ids += tokenizer.encode(chunk, add_special_tokens=False)
    return ids
