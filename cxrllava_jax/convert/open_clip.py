"""open_clip's VisionTransformer layout (the release's `vision_tower.*` uses the same names)."""

from cxrllava_jax.convert.mapping import Entry, expected_shapes, import_params
from cxrllava_jax.convert.safetensors_io import SafetensorsReader
from cxrllava_jax.models.configs import VisionConfig


def vit_entries(cfg: VisionConfig, torch_prefix: str = "visual.", our_prefix: str = "") -> list[Entry]:
    t, o = torch_prefix, our_prefix
    entries = [Entry(f"{t}conv1.weight", f"{o}conv1/kernel", "conv"),
               Entry(f"{t}class_embedding", f"{o}class_embedding", "copy"),
               Entry(f"{t}positional_embedding", f"{o}positional_embedding", "copy")]
    entries += _layer_norm(f"{t}ln_pre", f"{o}ln_pre") if not cfg.no_ln_pre else []
    for i in range(cfg.layers):
        tb, ob = f"{t}transformer.resblocks.{i}.", f"{o}resblocks_{i}/"
        entries += _layer_norm(f"{tb}ln_1", f"{ob}ln_1") + _layer_norm(f"{tb}ln_2", f"{ob}ln_2")
        for part, name in enumerate("qkv"):
            entries.append(Entry(f"{tb}attn.in_proj_weight", f"{ob}attn/{name}/kernel", "heads_in", cfg.heads, part, 3))
            entries.append(Entry(f"{tb}attn.in_proj_bias", f"{ob}attn/{name}/bias", "heads_bias", cfg.heads, part, 3))
        entries += [Entry(f"{tb}attn.out_proj.weight", f"{ob}attn/out/kernel", "heads_out", cfg.heads),
                    Entry(f"{tb}attn.out_proj.bias", f"{ob}attn/out/bias", "copy")]
        for name in ("c_fc", "c_proj"):
            entries += [Entry(f"{tb}mlp.{name}.weight", f"{ob}{name}/kernel", "linear"),
                        Entry(f"{tb}mlp.{name}.bias", f"{ob}{name}/bias", "copy")]
        if cfg.ls_init_value is not None:
            entries += [Entry(f"{tb}ls_1.gamma", f"{ob}ls_1", "copy"), Entry(f"{tb}ls_2.gamma", f"{ob}ls_2", "copy")]
    entries += _layer_norm(f"{t}ln_post", f"{o}ln_post") + [Entry(f"{t}proj", f"{o}proj", "copy")]
    return entries


def _layer_norm(torch_name: str, our_name: str) -> list[Entry]:
    return [Entry(f"{torch_name}.weight", f"{our_name}/scale", "copy"), Entry(f"{torch_name}.bias", f"{our_name}/bias", "copy")]


def vit_expected_shapes(cfg: VisionConfig) -> dict:
    import jax.numpy as jnp

    from cxrllava_jax.models.vit import VisionTransformer

    return expected_shapes(VisionTransformer(cfg), jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels)))


def load_open_clip_vit(directory, cfg: VisionConfig, torch_prefix: str = "visual.") -> dict:
    """An open_clip vision tower from a safetensors directory -> our ViT params (unscanned).

    open_clip state dicts carry no config, so the caller states the architecture; every tensor is
    checked against it. The text tower's keys (a full CLIP checkpoint) are ignored.
    """
    reader = SafetensorsReader(directory)
    ignored = [k for k in reader.keys() if not k.startswith(torch_prefix)]
    return import_params(vit_entries(cfg, torch_prefix), reader, str(directory), vit_expected_shapes(cfg), ignored)
