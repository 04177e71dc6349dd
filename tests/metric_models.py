"""Tiny stand-ins for the weights RadEval's metrics load, written in those metrics' own formats and caches, so that
`eval.py --metrics=...` runs end to end offline: a Hugging Face cache laid out as huggingface_hub writes it, and
RadEval's CheXbert cache (appdirs' user cache `chexbert`, under XDG_CACHE_HOME)."""

from pathlib import Path

# CheXbert's heads in its own order (RadEval's F1CheXbert.CONDITION_NAMES, then No Finding) and its classes.
CHEXBERT_HEADS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices", "No Finding")
BLANK, POSITIVE, NEGATIVE, UNCERTAIN = range(4)
_WORDS = ("the", "heart", "is", "enlarged", "normal", "no", "pleural", "effusion", "small", "left", "right", "lungs",
          "are", "clear", "edema", "pneumothorax", "mild", "cardiomegaly", ".", ",")
_SNAPSHOT = "0" * 40


def hub_model(hub: Path, repo: str, files: dict) -> Path:
    """Writes `files` ({name: text or bytes}) as the cached snapshot of `repo`; returns the snapshot directory."""
    model = hub / f"models--{repo.replace('/', '--')}"
    snapshot = model / "snapshots" / _SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    (model / "refs").mkdir(exist_ok=True)
    (model / "refs" / "main").write_text(_SNAPSHOT)
    for name, content in files.items():
        (snapshot / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return snapshot


def vocabulary() -> str:
    return "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS]) + "\n"


def write_chexbert(hub: Path, xdg_cache: Path, head_classes: dict) -> None:
    """bert-base-uncased's configuration and vocabulary (a 1-layer, 16-wide BERT) and a chexbert.pth whose heads
    ignore the text: head j answers `head_classes[CHEXBERT_HEADS[j]]` (NEGATIVE when not given; No Finding's
    2-way head answers 0 = no)."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(vocabulary().split()), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)
    hub_model(hub, "bert-base-uncased", {"config.json": config.to_json_string(),
                                         "vocab.txt": vocabulary(),
                                         "tokenizer_config.json": '{"do_lower_case": true, "model_max_length": 512}'})
    torch.manual_seed(0)
    state = {f"module.bert.{k}": v for k, v in BertModel(config).state_dict().items()}
    for j, name in enumerate(CHEXBERT_HEADS):
        classes = 2 if name == "No Finding" else 4
        bias = torch.zeros(classes)
        bias[head_classes.get(name, NEGATIVE if classes == 4 else 0)] = 10.0
        state[f"module.linear_heads.{j}.weight"] = torch.zeros(classes, 16)
        state[f"module.linear_heads.{j}.bias"] = bias
    checkpoint = xdg_cache / "chexbert" / "chexbert.pth"
    hub_model(xdg_cache / "chexbert", "StanfordAIMI/RRG_scorers", {})
    path = xdg_cache / "chexbert" / "models--StanfordAIMI--RRG_scorers" / "snapshots" / _SNAPSHOT / checkpoint.name
    torch.save({"model_state_dict": state}, path)


def write_distilbert(hub: Path) -> None:
    """distilbert-base-uncased as BERTScore loads it: 5 layers (it reads layer 5), 16 wide, random weights."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(vocabulary().split()), dim=16, n_layers=5, n_heads=2, hidden_dim=32)
    snapshot = hub_model(hub, "distilbert-base-uncased", {
        "vocab.txt": vocabulary(),
        "tokenizer_config.json": '{"do_lower_case": true, "model_max_length": 512, "tokenizer_class": "DistilBertTokenizer"}'})
    DistilBertModel(config).save_pretrained(snapshot)
