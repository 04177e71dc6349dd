"""Prompts: the exact LLaMA-2 chat strings of the release, their tokens with image positions, and errors."""

import numpy as np
import pytest

from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.tokenizer import load_tokenizer
from cxrllava_jax.reference.tiny_models import tokenizer_dir

SYSTEM = ("You are a helpful radiologist. Try to interpret chest x ray image and answer to the question that user "
          "provides.")
REPORT = ("<image>\nWrite a radiologic report on the given chest radiograph, including information about atelectasis, "
          "cardiomegaly, consolidation, pulmonary edema, pleural effusion, and pneumothorax.\n")
# Meta's LLaMA-2-chat tokenizer_config.json chat_template, which the release's tokenizer carries.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CONVERSATION = [{"role": "user", "content": "<image>\nIs there a pleural effusion?"},
                {"role": "assistant", "content": "Yes, a small left pleural effusion. "},
                {"role": "user", "content": "Is there a pneumothorax?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_dir())


def test_release_prompts_word_for_word():
    assert prompting.SYSTEM_PROMPT == SYSTEM
    assert prompting.REPORT_PROMPT == REPORT
    assert prompting.DIFFERENTIAL_PROMPT == "<image>\nWhat are the possible differential diagnoses for this patient?\n"
    assert prompting.question_prompt("Is the heart enlarged?") == "<image>\nIs the heart enlarged?"


def test_single_turn_chat_string():
    assert prompting.chat_text([{"role": "user", "content": REPORT}]) == (
        "<s>[INST] <<SYS>>\nYou are a helpful radiologist. Try to interpret chest x ray image and answer to the "
        "question that user provides.\n<</SYS>>\n\n<image>\nWrite a radiologic report on the given chest radiograph, "
        "including information about atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and "
        "pneumothorax. [/INST]")


def test_multi_turn_chat_string():
    assert prompting.chat_text(CONVERSATION) == (
        f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n<image>\nIs there a pleural effusion? [/INST] "
        "Yes, a small left pleural effusion. </s><s>[INST] Is there a pneumothorax? [/INST]")


@pytest.mark.parametrize("turns", [[{"role": "user", "content": REPORT}], CONVERSATION], ids=["single", "multi"])
def test_chat_string_equals_the_llama2_template(tokenizer, turns):
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}] + turns,
                                             chat_template=LLAMA2_CHAT_TEMPLATE, tokenize=False)
    assert prompting.chat_text(turns) == rendered


def test_tokens_hold_the_image_positions_and_the_turns(tokenizer):
    ids = prompting.encode_prompt(CONVERSATION, tokenizer, num_image_tokens=16, image_token_id=-200)
    image_at = np.flatnonzero(ids == -200)
    assert len(image_at) == 16 and np.all(np.diff(image_at) == 1)
    assert ids[0] == tokenizer.bos_token_id
    assert (ids == tokenizer.bos_token_id).sum() == 2 and (ids == tokenizer.eos_token_id).sum() == 1
    text = tokenizer.decode(ids[ids >= 0])
    assert "Is there a pleural effusion?" in text and text.rstrip().endswith("[/INST]")

    full = CONVERSATION + [{"role": "assistant", "content": "No pneumothorax."}]
    ids, answer_mask = prompting.encode_conversation(full, tokenizer, 16, -200)
    answers = tokenizer.decode(ids[answer_mask & (ids != tokenizer.eos_token_id)])
    assert answers.split() == "Yes, a small left pleural effusion. No pneumothorax.".split()
    assert ids[answer_mask][-1] == tokenizer.eos_token_id and not answer_mask[image_at].any()


def test_prompt_that_leaves_no_room_names_the_lengths(tokenizer):
    length = len(prompting.encode_prompt(CONVERSATION, tokenizer, 16, -200))
    prompting.encode_prompt(CONVERSATION, tokenizer, 16, -200, max_length=length + 2)
    with pytest.raises(prompting.PromptTooLongError, match=f"{length} tokens \\(16 of them image positions\\).*"
                                                           f"context is {length + 1}"):
        prompting.encode_prompt(CONVERSATION, tokenizer, 16, -200, max_length=length + 1)


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
        prompting.encode_prompt(CONVERSATION[:2], tokenizer, 16, -200)
