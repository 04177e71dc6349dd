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
          "are", "clear", "edema", "pneumothorax", "mild", "cardiomegaly", ".", ",", *"0123456789")
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


def write_bertscore_models(hub: Path) -> None:
    """distilbert-base-uncased (BERTScore) and distilroberta-base (RadCliQ's BERTScore) as they are loaded: 5 layers
    (both read layer 5), 16 wide, random weights, a word-piece vocabulary."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    size = len(vocabulary().split())
    models = {"distilbert-base-uncased": DistilBertModel(DistilBertConfig(vocab_size=size, dim=16, n_layers=5,
                                                                          n_heads=2, hidden_dim=32)),
              "distilroberta-base": RobertaModel(RobertaConfig(vocab_size=size, hidden_size=16, num_hidden_layers=5,
                                                               num_attention_heads=2, intermediate_size=32,
                                                               pad_token_id=0, max_position_embeddings=514))}
    for repo, model in models.items():
        snapshot = hub_model(hub, repo, {"vocab.txt": vocabulary(), "tokenizer_config.json":
                                         '{"do_lower_case": true, "model_max_length": 512, '
                                         '"tokenizer_class": "BertTokenizer"}'})
        model.save_pretrained(snapshot)


def write_radgraph(hub: Path, xdg_cache: Path, model_type: str = "radgraph-xl") -> None:
    """A RadGraph archive as RadEval unpacks it (`config.json`, `vocabulary/`, `weights.th` in the user cache
    radgraph/0.1.18/<model_type>): a DyGIE model over a 1-layer, 16-wide BERT (`tiny/radgraph-bert` in the Hugging
    Face cache) whose entity scorer calls every span an observation, so identical reports give identical graphs."""
    import json

    import torch
    from transformers import BertConfig, BertModel

    from cxrllava_jax.evaluation import model_metrics

    model_metrics.radeval_registry()  # the vendored RadGraph imports itself as `RadEval`
    from radeval.metrics.radgraph._vendor import core

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocabulary().split()), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)
    snapshot = hub_model(hub, "tiny/radgraph-bert", {"vocab.txt": vocabulary(),
                                                     "tokenizer_config.json": '{"do_lower_case": true, '
                                                                              '"model_max_length": 512}'})
    BertModel(config).save_pretrained(snapshot)
    archive = xdg_cache / "radgraph" / "0.1.18" / model_type
    (archive / "vocabulary").mkdir(parents=True)
    labels = {"ner_labels": ["", "Observation::definitely present", "Anatomy::definitely present"],
              "relation_labels": ["", "located_at", "modify", "suggestive_of"]}
    for namespace, tokens in labels.items():
        (archive / "vocabulary" / f"{model_type}__{namespace}.txt").write_text("\n".join(tokens) + "\n")
    (archive / "vocabulary" / "non_padded_namespaces.txt").write_text("*labels\n*tags\n")
    bert = {"model_name": "tiny/radgraph-bert", "max_length": 512}
    model = {"type": "dygie", "embedder": {"token_embedders": {"bert": bert}}, "initializer": {},
             "module_initializer": {}, "feature_size": 8, "max_span_width": 4, "target_task": "relation",
             "feedforward_params": {"num_layers": 1, "hidden_dims": 8, "dropout": 0.0},
             "loss_weights": {"ner": 1.0, "relation": 1.0, "coref": 0.0, "events": 0.0},
             "modules": {"coref": {"spans_per_word": 0.3, "max_antecedents": 10}, "ner": {},
                         "relation": {"spans_per_word": 0.5},
                         "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                                    "loss_weights": {"trigger": 1.0, "arguments": 1.0}}}}
    (archive / "config.json").write_text(json.dumps({"dataset_reader": {"token_indexers": {"bert": bert},
                                                                        "max_span_width": 4},
                                                     "model": model}))
    # The model RadGraph builds from this configuration (radeval's radgraph/_vendor/core.py, RadGraph.__init__).
    vocab = core.Vocabulary.from_files(archive / "vocabulary", None, None)
    embedder = core.text_field_embedders.BasicTextFieldEmbedder(  # from the snapshot: this process's cache may differ
        {"bert": core.token_embedders.PretrainedTransformerMismatchedEmbedder(str(snapshot), max_length=512)})
    arguments = {k: v for k, v in model.items() if k not in ("type", "embedder", "initializer", "module_initializer")}
    dygie = core.dygie.DyGIE(vocab=vocab, embedder=embedder, **arguments)
    state = dygie.state_dict()
    for name in [n for n in state if n.startswith("_ner._ner_scorers.") and n.endswith(".1._module.weight")]:
        state[name] = torch.zeros_like(state[name])
        bias = name.replace(".weight", ".bias")
        state[bias] = torch.tensor([10.0] + [0.0] * (len(state[bias]) - 1))  # every span: Observation
    torch.save(state, archive / "weights.th")
