"""Model cards: README.md in the Hugging Face Hub's format beside every model we write.

    DIR/README.md   YAML metadata (license, base_model, library_name, tags, datasets, pipeline_tag and, once
                    eval.py has scored the model, model-index results) between '---' lines, then the card's text
    DIR/card.json   the facts the card is rendered from, so that an export or a later evaluation re-renders it

Facts: {"format": "cxrllava-jax" | "release" | "hf-llama" | "peft", "model_kind": "cxr_llava" | ...,
"base_model": a Hub id or null, "base_source": where the weights started (any path), "training": {"task",
"steps", "config": {key: value}} or null, "datasets": [...], "evaluations": [{"dataset", "split", "scores":
{name: value}}]}. The metadata is written with `huggingface_hub.ModelCardData`, whose parser reads it back.
"""

import json
from pathlib import Path

from cxrllava_jax import files, hub

CARD, FACTS = "README.md", "card.json"
LIBRARIES = {"cxrllava-jax": "cxrllava-jax", "release": "transformers", "hf-llama": "transformers", "peft": "peft"}
PIPELINES = {"cxr_llava": "image-text-to-text", "llama": "text-generation"}
INTENDED_USE = (
    "For research only. It is not a medical device, has not been cleared or approved by any regulator, and must "
    "not be used to diagnose, treat or triage patients or to replace a radiologist's reading. Generated reports can "
    "be wrong, incomplete or invented, and can carry the biases of the data the model was trained on.")
_USAGE = {
    "cxrllava-jax": "```python\nfrom cxrllava_jax.inference.api import CXRLLaVA\n\nmodel = CXRLLaVA.from_pretrained"
                    "(\"{ref}\")\nprint(model.write_radiologic_report(\"cxr.png\"))\n```",
    "release": "```python\nfrom transformers import AutoModel\n\nmodel = AutoModel.from_pretrained(\"{ref}\", "
               "trust_remote_code=True)  # our modeling_cxrllava.py\nprint(model.write_radiologic_report("
               "PIL.Image.open(\"cxr.png\")))\n```\n\nThe same directory loads in cxrllava-jax: "
               "`CXRLLaVA.from_pretrained(\"{ref}\")`.",
    "hf-llama": "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\nmodel = "
                "AutoModelForCausalLM.from_pretrained(\"{ref}\")\n```\n\nThe language model alone (no image encoder).",
    "peft": "```python\nfrom cxrllava_jax.inference.api import CXRLLaVA\n\nmodel = CXRLLaVA.from_pretrained(\"{base}\", "
            "adapter=\"{ref}\")\n```\n\nor `peft.PeftModel.from_pretrained(model, \"{ref}\")` on the language model of "
            "the base's hf-llama export.",
}


def write(directory, facts: dict):
    """Writes DIR/card.json and the README.md rendered from it (each replaced atomically)."""
    directory = Path(directory)
    files.write_text_atomically(directory / FACTS, json.dumps(facts, indent=2) + "\n")
    files.write_text_atomically(directory / CARD, render(facts, directory.name))


def read(directory) -> dict | None:
    """The facts of the card in `directory`, or None where it has none (a model made elsewhere)."""
    path = Path(directory) / FACTS
    return files.read_json(path) if path.is_file() else None


def add_evaluation(directory, evaluation: dict) -> bool:
    """Adds (or replaces, for the same dataset and split) an evaluation to the card of our model in `directory`.
    Models without our card and snapshots in a Hugging Face cache (never written into) are left alone: False."""
    facts = read(directory)
    if facts is None or hub.hub_id(directory) is not None:
        return False
    kept = [e for e in facts.get("evaluations", [])
            if (e["dataset"], e["split"]) != (evaluation["dataset"], evaluation["split"])]
    write(directory, {**facts, "evaluations": kept + [evaluation]})
    return True


def render(facts: dict, name: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    fmt, kind = facts["format"], facts.get("model_kind", "cxr_llava")
    base = facts.get("base_model")
    tags = ["medical", "radiology", "chest-x-ray", "cxr-llava", "jax" if fmt == "cxrllava-jax" else "pytorch"]
    if fmt == "peft":
        tags += ["lora", *([f"base_model:adapter:{base}"] if base else [])]
    results = [EvalResult(task_type="image-to-text", dataset_type=e["dataset"], dataset_name=e["dataset"],
                          dataset_split=e["split"], metric_type=metric, metric_name=metric, metric_value=value)
               for e in facts.get("evaluations", []) for metric, value in e["scores"].items()]
    data = ModelCardData(
        license="other", license_name="base-model-and-data-terms", base_model=base,
        library_name=LIBRARIES[fmt], pipeline_tag=None if fmt == "peft" else PIPELINES.get(kind),
        tags=tags, datasets=facts.get("datasets") or None, model_name=name, eval_results=results or None)
    return f"---\n{data.to_yaml()}\n---\n\n{_body(facts, name)}"


def _body(facts: dict, name: str) -> str:
    fmt, kind = facts["format"], facts.get("model_kind", "cxr_llava")
    what = {"cxr_llava": "CXR-LLaVA, a chest X-ray multimodal model (a ViT image encoder for grayscale "
                         "radiographs, a projector and a LLaMA-family language model) that writes radiologic "
                         "reports, differential diagnoses and answers questions about a chest radiograph",
            "llama": "the language model of CXR-LLaVA (a LLaMA-family causal LM)"}.get(kind, f"a {kind} model")
    layout = {"cxrllava-jax": "a cxrllava-jax checkpoint (Orbax parameters, model_config.json, tokenizer/)",
              "release": "the released CXR-LLaVA PyTorch layout (safetensors, config.json) with its own modeling "
                         "code (`modeling_cxrllava.py`, `trust_remote_code=True`)",
              "hf-llama": "a Hugging Face LlamaForCausalLM directory",
              "peft": "a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) for the base model"}[fmt]
    lines = [f"# {name}", "", f"{what[0].upper()}{what[1:]}.", "", f"This directory is {layout}, written by "
             "cxrllava-jax (a JAX/Flax reimplementation of CXR-LLaVA).", ""]
    base = facts.get("base_model") or facts.get("base_source")
    lines += ["## Training", ""]
    training = facts.get("training")
    if training:
        lines.append(f"Task `{training['task']}` of `train.py`, {training['steps']} steps"
                     + (f", starting from `{base}`" if base else "") + ". Settings:")
        lines += [""] + [f"- `{key}`: `{value}`" for key, value in training.get("config", {}).items()]
    else:
        lines.append("Converted, not trained here" + (f": from `{base}`." if base else "."))
    if facts.get("datasets"):
        lines += ["", "Data: " + ", ".join(f"`{d}`" for d in facts["datasets"]) + "."]
    lines += ["", "## Evaluation", ""]
    evaluations = facts.get("evaluations") or []
    if evaluations:
        lines += ["Scored by `eval.py` (the paper's protocol: CheXpert-style labels of generated and reference "
                  "reports, per-finding F1 averaged).", "", "| dataset | split | metric | value |", "|---|---|---|---|"]
        lines += [f"| {e['dataset']} | {e['split']} | {metric} | {value:.4f} |"
                  for e in evaluations for metric, value in e["scores"].items()]
    else:
        lines.append("Not evaluated yet: `python eval.py --checkpoint=THIS_DIRECTORY ...` adds its results here.")
    lines += ["", "## Use", "", _USAGE[fmt].format(ref=f"path/to/{name}", base=facts.get("base_model") or "BASE"), "",
              "## Intended use and limits", "", INTENDED_USE, "",
              "License: the terms of the base model (LLaMA-2's Community License for LLaMA-2 weights) and of the "
              "training data (e.g. PhysioNet's credentialed data use agreement for MIMIC-CXR) apply.", ""]
    return "\n".join(lines)
