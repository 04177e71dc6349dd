"""Prompts with LLaMA-2's own tokenizer: the release's chat strings and prompt ids, LLaVA's training encoding, errors.

`fixtures/llama2-tokenizer/release_prompt_ids.json` holds the ids the release's own procedure gives under the
transformers it pins (4.36.2), written by the script beside it.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.tokenizer import load_tokenizer

LLAMA2 = Path(__file__).parent / "fixtures" / "llama2-tokenizer"
GOLDEN = json.loads((LLAMA2 / "release_prompt_ids.json").read_text())
SYSTEM = GOLDEN["system"]
CHATS = GOLDEN["chats"]
LEGACY = {"legacy_default": {}, "legacy_false": {"legacy": False}}


def release_like_dir(directory: Path, **config) -> Path:
    """tokenizer.model + tokenizer_config.json, as the release ships its tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(LLAMA2 / "tokenizer.model", directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, **config}))
    return directory


@pytest.fixture(scope="module", params=list(LEGACY))
def tokenizer_and_golden(request, tmp_path_factory):
    directory = release_like_dir(tmp_path_factory.mktemp(request.param), **LEGACY[request.param])
    return load_tokenizer(directory), GOLDEN[request.param]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(release_like_dir(tmp_path_factory.mktemp("llama2")))


def test_release_prompts_word_for_word():
    assert prompting.SYSTEM_PROMPT == SYSTEM
    assert [{"role": "user", "content": prompting.REPORT_PROMPT}] == CHATS["report"]
    assert [{"role": "user", "content": prompting.DIFFERENTIAL_PROMPT}] == CHATS["differential"]
    assert [{"role": "user", "content": prompting.question_prompt("Is there a pneumothorax?")}] == CHATS["question"]


@pytest.mark.parametrize("chat", list(CHATS))
def test_chat_string_and_ids_equal_the_release_procedure(tokenizer_and_golden, chat):
    tokenizer, golden = tokenizer_and_golden
    assert prompting.chat_text(CHATS[chat]) == golden[chat]["text"]
    ids = prompting.encode_prompt(CHATS[chat], tokenizer, num_image_tokens=1, image_token_id=-200)
    assert ids.tolist() == golden[chat]["ids"]


def test_report_prompt_starts_with_two_bos_and_the_legacy_prefix(tokenizer):
    """`<s> <s> ▁[ INST ]`: the tokenizer's BOS, the template's `<s>`, then "▁[" as 4.36.2 splits it."""
    ids = prompting.encode_prompt(CHATS["report"], tokenizer, num_image_tokens=1, image_token_id=-200)
    assert [tokenizer.sp.id_to_piece(int(i)) for i in ids[:5]] == ["<s>", "<s>", "▁[", "INST", "]"]


def test_todays_transformers_splits_after_special_tokens_differently(tokenizer):
    """Why the tokenizer is ours: transformers 5 gives the text after `<s>` no "▁", whatever the config says;
    with its Metaspace pre-tokenizer prepending "▁" to every piece it agrees with 4.36.2's legacy tokenizer."""
    import transformers
    from tokenizers.pre_tokenizers import Metaspace

    directory = Path(tokenizer.directory)
    today = transformers.LlamaTokenizer.from_pretrained(str(directory))
    text = prompting.chat_text(CHATS["three_turns"]).replace(prompting.IMAGE, "")
    assert today(text)["input_ids"] != tokenizer(text)["input_ids"]
    today.backend_tokenizer.pre_tokenizer = Metaspace(replacement="▁", prepend_scheme="always", split=False)
    assert today(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert today.decode(today(text)["input_ids"], skip_special_tokens=True) == tokenizer.decode(
        tokenizer(text)["input_ids"])


def llava_llama2_prompt(turns, system: str) -> str:
    """LLaVA's `Conversation.get_prompt()` for SeparatorStyle.LLAMA_2 (sep `<s>`, sep2 `</s>`)."""
    ret = ""
    for i, turn in enumerate(turns):
        message = turn["content"].strip()
        if i == 0:
            message = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + message
        ret += f"<s>[INST] {message} [/INST]" if i % 2 == 0 else f" {message} </s>"
    return ret.lstrip("<s>")


def test_training_encodes_llavas_llama2_conversation_format(tokenizer):
    turns = CHATS["three_turns"] + [{"role": "assistant", "content": "No pneumothorax."}]
    ids, answer_mask = prompting.encode_conversation(turns, tokenizer, 16, -200)
    expected = prompting.tokenize_with_images(llava_llama2_prompt(turns, SYSTEM), tokenizer, 16, -200)
    assert ids.tolist() == expected
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id  # LLaVA strips the text's `<s>`
    # Each answer (with the space the template puts before `</s>`) and its `</s>` are scored; nothing else is.
    spans = np.split(np.flatnonzero(answer_mask), np.flatnonzero(np.diff(np.flatnonzero(answer_mask)) > 1) + 1)
    answers = [t["content"] for t in turns if t["role"] == "assistant"]
    assert [tokenizer.decode(ids[s[:-1]]).strip() for s in spans] == answers
    assert all(ids[s[-1]] == tokenizer.eos_token_id for s in spans)
    assert not answer_mask[ids == -200].any()


def test_prompt_that_leaves_no_room_names_the_real_lengths(tokenizer):
    grid_tokens = 1024  # ViT-L/16 at 512 pixels
    length = len(GOLDEN["legacy_default"]["three_turns"]["ids"]) - 1 + grid_tokens
    prompting.encode_prompt(CHATS["three_turns"], tokenizer, grid_tokens, -200, max_length=length + 2)
    with pytest.raises(prompting.PromptTooLongError, match=f"is {length} tokens \\({grid_tokens} of them image "
                                                           f"positions\\).*context is {length + 1}"):
        prompting.encode_prompt(CHATS["three_turns"], tokenizer, grid_tokens, -200, max_length=length + 1)


@pytest.mark.parametrize("turns, message", [
    ([{"role": "assistant", "content": "hi"}], "alternates"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternates"),
    ([{"role": "user", "content": "<image>\na"}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": "<image>\nc"}], "only the first user turn"),
])
def test_malformed_conversations_are_refused(tokenizer, turns, message):
    with pytest.raises(ValueError, match=message):
        prompting.encode_conversation(turns, tokenizer, 16, -200)


def test_prompt_must_end_with_the_user(tokenizer):
    with pytest.raises(ValueError, match="last turn must be the user's"):
        prompting.encode_prompt(CHATS["three_turns"][:2], tokenizer, 16, -200)
