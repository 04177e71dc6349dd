"""The field's model-based report metrics, through RadEval (the optional extra: pip install 'cxrllava-jax[metrics]').

`eval.py --metrics=radgraph,bertscore,ratescore,chexbert,green,radcliq` (any subset) scores generated reports against
the references with the implementations report-generation papers and ReXrank use. RadEval (jbdel/RadEval) keeps them
together and running on transformers 5; the single packages they came from (`radgraph`, `f1chexbert`, `bert-score`,
`RaTEScore`, `green-score`) pin older transformers or huggingface_hub APIs.

| --metrics  | RadEval metric | what it reports | weights |
|------------|----------------|-----------------|---------|
| radgraph   | radgraph       | RadGraph F1 (simple, partial, complete; RadGraph-XL) | RRG_scorers radgraph-xl.tar.gz |
| bertscore  | bertscore      | BERTScore F1 (distilbert-base-uncased, layer 5, rescaled) | distilbert-base-uncased |
| ratescore  | ratescore      | RaTEScore | RaTE-NER-Deberta, BioLORD-2023-C (and the medspacy package) |
| chexbert   | f1chexbert     | CheXbert F1-14 / F1-5, micro, macro, weighted | bert-base-uncased, RRG_scorers chexbert.pth |
| green      | green          | GREEN (a 7B model: needs a CUDA GPU) | GREEN-radllama2-7b |
| radcliq    | radcliq        | RadCliQ-v1 (lower raw score is better; RadEval reports 1 / mean) | radgraph.tar.gz, distilroberta-base, CheXbert |

Weights are read where those metrics look for them and never downloaded here (HF_HUB_OFFLINE is set while they load):
the Hugging Face cache for transformer models, and RadEval's own caches for the CheXbert checkpoint
(appdirs' user cache `chexbert`) and the RadGraph archives (user cache `radgraph/0.1.18`). Every requirement of
the chosen metrics is checked before any model loads or any report is generated; a missing one is one line naming
what to install or download.
"""

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import sys
import tarfile

from cxrllava_jax.errors import ConfigError

_RRG_SCORERS = "StanfordAIMI/RRG_scorers"
_RADGRAPH_VERSION = "0.1.18"  # RadEval keeps RadGraph's archives under this upstream release's cache directory


class MetricUnavailable(ConfigError):
    """A chosen metric cannot run here; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Weights:
    """A file a metric loads: from the Hugging Face cache (`cache` None), or from one of RadEval's own caches
    (`cache` = the appdirs application name, and for RadGraph its version directory)."""

    repo: str
    filename: str = "config.json"
    cache: tuple = ()
    extracted: str = ""  # RadGraph: the directory RadEval unpacks the archive into (present: the archive is not needed)


@dataclasses.dataclass(frozen=True)
class ModelMetric:
    radeval_name: str
    weights: tuple
    packages: tuple = ()  # modules the metric imports beyond RadEval's own requirements that we install
    needs_gpu: bool = False


_CHEXBERT = (Weights("bert-base-uncased"), Weights(_RRG_SCORERS, "chexbert.pth", ("chexbert",)))
METRICS = {
    "radgraph": ModelMetric("radgraph", (Weights(_RRG_SCORERS, "radgraph-xl.tar.gz", ("radgraph", _RADGRAPH_VERSION),
                                                 "radgraph-xl"),)),
    "bertscore": ModelMetric("bertscore", (Weights("distilbert-base-uncased"),)),
    "ratescore": ModelMetric("ratescore", (Weights("Angelakeke/RaTE-NER-Deberta"),
                                           Weights("FremyCompany/BioLORD-2023-C")), packages=("medspacy",)),
    "chexbert": ModelMetric("f1chexbert", _CHEXBERT),
    "green": ModelMetric("green", (Weights("StanfordAIMI/GREEN-radllama2-7b"),), packages=("datasets",),
                         needs_gpu=True),
    "radcliq": ModelMetric("radcliq", (Weights(_RRG_SCORERS, "radgraph.tar.gz", ("radgraph", _RADGRAPH_VERSION),
                                               "radgraph"), Weights("distilroberta-base"), *_CHEXBERT)),
}


def parse(text: str | None, answer_kind: str = "report") -> tuple:
    """'radgraph,bertscore' -> ('radgraph', 'bertscore'); an unknown name, or metrics for answers without report
    texts, is an error."""
    names = tuple(dict.fromkeys(n.strip() for n in (text or "").split(",") if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricUnavailable(f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if names and answer_kind != "report":
        raise MetricUnavailable(f"--metrics compares report texts; config.answer_kind={answer_kind} has none")
    return names


def check(names) -> None:
    """Raises MetricUnavailable naming the first thing a chosen metric lacks: RadEval, a package, a GPU, weights."""
    if not names:
        return
    radeval_registry()
    for name in names:
        metric = METRICS[name]
        for package in metric.packages:
            if importlib.util.find_spec(package) is None:
                raise MetricUnavailable(f"--metrics={name} needs the {package} package (pip install {package})")
        if metric.needs_gpu:
            import torch

            if not torch.cuda.is_available():
                raise MetricUnavailable(f"--metrics={name} runs a 7B model and needs a CUDA GPU; torch sees none here")
        for weights in metric.weights:
            missing = _missing(weights)
            if missing:
                raise MetricUnavailable(f"--metrics={name} needs {missing}")


def scores(names, references, generated) -> dict:
    """{metric: {RadEval's result keys: values}} for the chosen metrics over the pairs of report texts."""
    if not names:
        return {}
    check(names)
    get_metric_class = radeval_registry()
    results = {}
    with _offline():
        for name in names:
            try:
                metric = _build(get_metric_class(METRICS[name].radeval_name))
                results[name] = metric.compute(list(references), list(generated), detailed=True)
            except OSError as error:  # a file the checks above cannot foresee (a model an archive names)
                raise MetricUnavailable(f"--metrics={name} needs {_missing_model(error)}") from None
    return results


def summary_line(results: dict) -> str:
    """The metrics' headline numbers under the tables (nested breakdowns stay in results.json)."""
    cells = [f"{key} {value:.4f}" for per_metric in results.values() for key, value in per_metric.items()
             if isinstance(value, float)]
    return f"\nModel-based metrics (RadEval): {', '.join(cells)}\n" if cells else ""


def radeval_registry():
    """RadEval's lazy metric registry."""
    if importlib.util.find_spec("radeval") is None:
        raise MetricUnavailable("--metrics needs RadEval: pip install 'cxrllava-jax[metrics]'")
    import nltk

    # RadEval fetches NLTK's punkt tables from the network when imported; nothing may download here, and none of
    # the metrics above reads them.
    download, nltk.download = nltk.download, lambda *args, **kwargs: True
    try:
        import radeval
        from radeval.metrics._registry import get_metric_class
    finally:
        nltk.download = download
    # RadEval 2.2 installs as `radeval` while its RadGraph code imports `RadEval` (jbdel/RadEval#27).
    sys.modules.setdefault("RadEval", radeval)
    return get_metric_class


def _build(metric_class):
    """RadEval's metric, on the device torch has."""
    if metric_class.name != "f1chexbert":
        return metric_class()
    import torch
    from radeval.metrics.f1chexbert.f1chexbert import F1CheXbert

    class OnThisDevice(metric_class):
        """RadEval 2.2's F1CheXbert metric places CheXbert on "cuda" even where torch has no CUDA."""

        def __init__(self):
            self._scorer = F1CheXbert(device="cuda" if torch.cuda.is_available() else "cpu")

    return OnThisDevice()


def _missing(weights: Weights) -> str:
    """'' when the file is where the metric will look for it, else what to download and where."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = _radeval_cache(weights.cache) if weights.cache else None
    if weights.extracted:
        unpacked = os.path.join(cache_dir, weights.extracted)
        archive = try_to_load_from_cache(weights.repo, weights.filename, cache_dir=cache_dir)
        config = _archive_config(unpacked, archive if isinstance(archive, str) else None)
        if config is not None:  # the archive is there; its tagger runs on a transformer from the Hugging Face cache
            return _missing(Weights(config["dataset_reader"]["token_indexers"]["bert"]["model_name"]))
    elif isinstance(try_to_load_from_cache(weights.repo, weights.filename, cache_dir=cache_dir), str):
        return ""
    if cache_dir:
        return (f"{weights.repo}/{weights.filename} in {cache_dir}: "
                f"hf download {weights.repo} {weights.filename} --cache-dir {cache_dir}")
    return f"{weights.repo} in the Hugging Face cache: hf download {weights.repo}"


def _archive_config(unpacked: str, archive: str | None):
    """A RadGraph archive's config.json, from the directory RadEval unpacks it into or from the archive itself."""
    if os.path.isfile(os.path.join(unpacked, "config.json")):
        with open(os.path.join(unpacked, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    if archive is None:
        return None
    with tarfile.open(archive, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.removeprefix("./") == "config.json")
        return json.load(tar.extractfile(member))


def _missing_model(error: BaseException) -> str:
    """What to download, from huggingface_hub's error somewhere in the chain that transformers raised."""
    while error is not None:
        found = re.search(r"repo_id: ([^,)\s]+)", str(error))
        if found:
            return f"{found[1]} in the Hugging Face cache: hf download {found[1]}"
        error = error.__cause__ or error.__context__
    return "a model file that is not in the Hugging Face cache (the metric runs offline)"


def _radeval_cache(parts) -> str:
    from appdirs import user_cache_dir

    return os.path.join(user_cache_dir(parts[0]), *parts[1:])


@contextlib.contextmanager
def _offline():
    """Model files come from the caches only: huggingface_hub and transformers read HF_HUB_OFFLINE."""
    import huggingface_hub.constants

    previous = os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], huggingface_hub.constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        if previous[0] is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = previous[0]
        huggingface_hub.constants.HF_HUB_OFFLINE = previous[1]
