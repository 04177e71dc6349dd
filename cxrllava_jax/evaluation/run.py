"""The evaluation protocol end to end: records of generated text -> labels -> scores -> tables and a results JSON.

Two kinds of answer (`config.answer_kind`), as in the paper (Figure 2):
- "report" (MIMIC, Indiana): the generated report and the reference report are both labeled by the report
  labeler (ours, labels from the CheXpert labeler's or CheXbert's files, or CheXbert: see `labelers`), and the
  labels compared; BLEU-1..4 and ROUGE-L of the texts are reported beside them.
- "json_labels" (CheXpert test): the model answered the label-generation prompt; its JSON is parsed and compared
  with reference labels.
A record is {"id", "generated", "reference"}: `reference` is the reference report (text) or its labels
({finding: 1 / 0 / -1 / null}). `evaluate_records` is everything after generation; a model run feeds it records.
Files written to the workdir: reference_labels.csv and predicted_labels.csv (CheXpert labeler format with an id
column first), table.md, table.csv, results.json, and for reports rexrank_predictions.json (ReXrank's per-study
prediction file). Every result carries, beside the paper's protocol, the field's standard aggregates (F1-14 and
F1-5, micro and macro: `metrics.standard_aggregates`) from the same labels.
"""

import collections
import dataclasses
import json
import pathlib

import ml_collections
import numpy as np

from cxrllava_jax import files, hub
from cxrllava_jax.convert import model_card
from cxrllava_jax.domain import label_files
from cxrllava_jax.evaluation import (
    changes, json_labels, labelers, metrics, model_metrics, paper_tables, references, tables, text_metrics,
)
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from cxrllava_jax.errors import ConfigError, InputError

ANSWER_KINDS = ("report", "json_labels")
# What an evaluation writes into its workdir, replaced together (eval.py stages them; see files.staged_directory).
# generated.jsonl is not among them: a run that re-scores it (--predictions) keeps it.
OUTPUTS = ("reference_labels.csv", "predicted_labels.csv", "table.md", "table.csv", "results.json",
           "rexrank_predictions.json")


@dataclasses.dataclass
class Scoring:
    """What was scored and how, and the figures beside the label scores; results.json carries the fields that
    are set, under their names."""

    answer_kind: str | None  # "report" or "json_labels"; None: two label CSVs were scored
    labeler: str | None = None  # who labeled the report texts (None: the label files were given)
    scored: str | None = None  # the data scored, when it is not config.dataset's split
    text_metrics: dict | None = None  # BLEU and ROUGE-L: `text_metrics.text_scores`
    model_metrics: dict | None = None  # `model_metrics.scores` (empty when none were asked for)
    change_statements: dict | None = None  # `changes.change_scores`, when references compare with a prior study
    unparsed_predictions: dict | None = None  # json_labels: {"count", "ids"} of answers that were no JSON labels

    def fields(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def checked_answer_kind(config) -> str:
    """`config.answer_kind`, checked. A config that still sets `config.task` (the key's name before) is refused,
    naming the new one, rather than evaluated as whatever `config.answer_kind` defaults to."""
    if "task" in config:
        raise ConfigError(f"config.task={config.task!r}: the key is now config.answer_kind (one of "
                          f"{', '.join(ANSWER_KINDS)})")
    if config.answer_kind not in ANSWER_KINDS:
        raise ConfigError(f"config.answer_kind={config.answer_kind!r}: expected one of {', '.join(ANSWER_KINDS)}")
    return config.answer_kind


def default_config() -> ml_collections.ConfigDict:
    """The fields every configs/eval_*.py sets; defaults follow the paper's MIMIC evaluation."""
    config = ml_collections.ConfigDict()
    config.dataset = "mimic"
    config.split = "test"
    config.paper_table = "mimic"  # key into paper_tables.TABLES
    config.answer_kind = "report"  # or "json_labels"
    config.uncertain = "exclude"  # or "positive", "negative": see metrics.LabelPolicy
    config.missing_reference = "exclude"  # or "negative"
    config.min_class_count = 10
    config.min_class_fraction = 0.05
    config.always_excluded = ("No Finding", "Enlarged Cardiomediastinum")
    config.bootstrap_samples = 1000
    config.seed = 0
    config.confidence = 0.95
    return config


def evaluate_model(config, checkpoint, data_dir, workdir, batch_size: int = 16, model=None, adapter=None,
                   report_labeler=None, limit=None, metric_names=()) -> dict:
    """Generates with the model at `checkpoint` (or `model`) over the test split (its first `limit` images), then
    scores the answers (`metric_names`: the model-based metrics of `model_metrics` to add).

    The answers are kept in workdir/generated.jsonl, which `evaluate_predictions` re-scores.
    """
    from cxrllava_jax.evaluation import generation
    from cxrllava_jax.inference.api import CXRLLaVA

    checked_answer_kind(config)  # before the model loads
    if model is None:
        adapter = adapter and hub.resolve(adapter, what="--adapter")
        checkpoint = hub.resolve(checkpoint, what="--checkpoint")
        model = CXRLLaVA.from_pretrained(checkpoint, adapter=adapter)
    records = generation.generate_records(config, model, data_dir, pathlib.Path(workdir) / "generated.jsonl",
                                          batch_size, limit)
    results = evaluate_records(config, records, workdir, report_labeler, metric_names=metric_names)
    if checkpoint is not None and adapter is None:  # the card describes the checkpoint alone, not with an adapter
        model_card.add_evaluation(checkpoint, card_evaluation(results))
    return results


def card_evaluation(results: dict) -> dict:
    """The figures a model card lists from results.json: each average's micro and macro F1, BLEU-4, ROUGE-L."""
    scores = {f"{name} {kind}-F1": round(average[kind]["f1"], 4)
              for name, average in results["result"]["averages"].items() for kind in ("micro", "macro")}
    text = results.get("text_metrics", {})
    scores.update({key.upper().replace("_", "-"): round(text[key], 4) for key in ("bleu_4", "rouge_l") if key in text})
    return {"dataset": results["dataset"], "split": results["split"], "scores": scores}


def evaluate_predictions(config, predictions_path, workdir, report_labeler=None, references_csv=None,
                         limit=None, metric_names=()) -> dict:
    """Scores a JSONL generated elsewhere (no model needed): eval's own {id, generated, reference} records, or
    `cxrllava report`'s {image, report} lines joined to `references_csv` by image. `limit`: its first records."""
    if references_csv:
        records = references.joined_records(predictions_path, references_csv, checked_answer_kind(config))
        scored = f"{pathlib.Path(predictions_path).name} against {pathlib.Path(references_csv).name}"
    elif references.is_report_output(predictions_path):
        raise InputError(f"{predictions_path}: `cxrllava report` lines have no reference; give --references=CSV "
                         "(an image column and each image's reference report)")
    else:
        records, scored = read_prediction_records(predictions_path), None
    return evaluate_records(config, records[:limit], workdir, report_labeler, scored, metric_names)


def read_prediction_records(path) -> list:
    """The {id, generated, reference} records of a JSONL file; ids must be unique (a repeated id would be scored
    twice). Errors name the file and line."""
    records, first_line = [], {}
    for line_number, record in files.read_json_lines(path):
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line_number}: not a JSON object but {type(record).__name__}")
        missing = [k for k in ("id", "generated", "reference") if k not in record]
        if missing:
            raise InputError(f"{path}:{line_number}: record lacks {missing}")
        if not isinstance(record["generated"], str):
            raise InputError(f"{path}:{line_number}: 'generated' must be text, not {type(record['generated']).__name__}")
        record_id = str(record["id"])
        if record_id in first_line:
            raise InputError(f"{path}:{line_number}: id {record_id!r} repeats line {first_line[record_id]}; "
                             "each case must be scored once")
        first_line[record_id] = line_number
        records.append(record)
    if not records:
        raise InputError(f"{path}: no records (one JSON object per line: id, generated, reference)")
    return records


def evaluate_records(config, records, workdir, report_labeler=None, scored=None, metric_names=()) -> dict:
    """Labels both sides of each {id, generated, reference} record, scores them, writes everything to `workdir`.

    `report_labeler` (a `labelers.Labeler`, ours by default) labels every report text. `scored` names the data
    when it is not config.dataset's split (the tables say what was scored). `metric_names`: model-based metrics
    (`model_metrics`) over the report texts."""
    answer_kind = checked_answer_kind(config)
    report_labeler = report_labeler or labelers.make("ours")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    records = list(records)
    ids = [str(r["id"]) for r in records]
    reference_rows = _reference_rows(records, report_labeler)
    scoring = Scoring(answer_kind, report_labeler.name, scored or None)
    if answer_kind == "report":
        predicted_rows = report_labeler.label_reports([r["generated"] for r in records])
        with_text = [r for r in records if isinstance(r["reference"], str)]
        if with_text:  # text metrics compare texts: records whose reference is labels have none
            # The model-based metrics first: they load models, and a refusal should leave nothing written.
            scoring.model_metrics = model_metrics.scores(metric_names, [r["reference"] for r in with_text],
                                                         [r["generated"] for r in with_text])
            scoring.text_metrics = text_metrics.text_scores([r["reference"] for r in with_text],
                                                            [r["generated"] for r in with_text])
            text_metrics.write_rexrank_json(workdir / "rexrank_predictions.json", with_text, config.split)
            compared = changes.change_scores([r["reference"] for r in with_text], [r["generated"] for r in with_text])
            if compared["statements"]:  # references that compare with a prior study
                scoring.change_statements = compared
    else:
        parsed = [json_labels.parse_json_labels(r["generated"]) for r in records]
        predicted_rows = [p.as_row() for p in parsed]
        unparsed = [str(r["id"]) for r, p in zip(records, parsed) if not p.parsed]
        scoring.unparsed_predictions = {"count": len(unparsed), "ids": unparsed}
    reference = label_files.LabelTable(_rows(reference_rows), ids, [_reference_text(r) for r in records])
    predicted = label_files.LabelTable(_rows(predicted_rows), ids, [r["generated"] for r in records])
    label_files.write_labels_csv(workdir / "reference_labels.csv", reference.reports, reference.labels, ids)
    label_files.write_labels_csv(workdir / "predicted_labels.csv", predicted.reports, predicted.labels, ids)
    return score_and_write(config, reference, predicted, workdir, scoring)


def evaluate_label_files(config, reference_csv, predicted_csv, workdir) -> dict:
    """Scores two label CSVs (ours, the CheXpert labeler's or CheXbert's): rows matched by id if both files have
    one, else by order."""
    reference, predicted = label_files.read_labels_csv(reference_csv), label_files.read_labels_csv(predicted_csv)
    for path, table in ((reference_csv, reference), (predicted_csv, predicted)):
        repeated = sorted(i for i, n in collections.Counter(table.ids).items() if n > 1)
        if repeated:
            raise InputError(f"{path}: ids must be unique to match rows; repeated: {repeated[:5]}")
    if sorted(reference.ids) == sorted(predicted.ids):
        order = {id_: i for i, id_ in enumerate(predicted.ids)}
        rows = [order[id_] for id_ in reference.ids]
        predicted = label_files.LabelTable(predicted.labels[rows], reference.ids, [predicted.reports[i] for i in rows])
    elif len(reference.ids) != len(predicted.ids):
        raise InputError(f"{reference_csv} has {len(reference.ids)} rows but {predicted_csv} has {len(predicted.ids)}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return score_and_write(config, reference, predicted, workdir, Scoring(None))


def score_and_write(config, reference, predicted, workdir, scoring: Scoring) -> dict:
    """Scores two LabelTables by the config's protocol and the standard aggregates; writes table.md, table.csv and
    results.json."""
    paper = paper_tables.TABLES[config.paper_table]
    result = metrics.score_labels(
        reference.labels,
        predicted.labels,
        policy=metrics.LabelPolicy(config.uncertain, config.missing_reference),
        rules=metrics.ExclusionRules(config.min_class_count, config.min_class_fraction, tuple(config.always_excluded)),
        bootstrap_samples=config.bootstrap_samples,
        seed=config.seed,
        confidence=config.confidence,
        averages={label: findings for label, (findings, _) in paper.averages.items()},
    )
    standard = metrics.standard_aggregates(reference.labels, predicted.labels, config.bootstrap_samples, config.seed,
                                           config.confidence)
    # The paper's figures sit beside ours only where we scored the paper's own test set.
    paper_columns = config.dataset == paper.dataset and scoring.scored is None
    title = _title(config, paper, scoring.scored, scoring.labeler or "the label files given", paper_columns)
    markdown = tables.markdown_table(result, paper, title, standard, paper_columns)
    if scoring.text_metrics is not None:
        markdown += tables.text_metrics_line(scoring.text_metrics)
    markdown += model_metrics.summary_line(scoring.model_metrics or {})
    files.write_text_atomically(workdir / "table.md", markdown)
    files.write_text_atomically(workdir / "table.csv", tables.csv_table(result, paper, standard, paper_columns))
    results = {
        "dataset": config.dataset,
        "split": config.split,
        "paper_table": config.paper_table,
        "title": title,
        **scoring.fields(),
        "reference_label_counts": _label_counts(reference.labels),
        "predicted_label_counts": _label_counts(predicted.labels),
        "result": result.to_dict(),
        "standard": standard.to_dict(),
    }
    files.write_text_atomically(workdir / "results.json", json.dumps(results, indent=2))  # last: marks it done
    return results


def _title(config, paper, scored, labeled_by, paper_columns) -> str:
    if paper_columns:
        return f"{paper.title}: ours on {config.dataset} / {config.split}, labels by {labeled_by}"
    table = paper.title.split(".")[0]
    return (f"F1 (95% CI) on {scored or f'{config.dataset} / {config.split}'}, labels by {labeled_by}; the protocol of "
            f"the paper's {table} (its figures are for the {paper.dataset} test set and are not shown)")


def _reference_rows(records, report_labeler):
    """Reference labels: reports (texts) labeled in one batch, label objects parsed."""
    texts = [r["reference"] for r in records if isinstance(r["reference"], str)]
    labeled = iter(report_labeler.label_reports(texts) if texts else ())
    return [next(labeled) if isinstance(r["reference"], str) else _parsed_reference(r) for r in records]


def _parsed_reference(record):
    reference = record["reference"]
    if not isinstance(reference, dict):
        raise InputError(f"record {record['id']}: reference must be a report (text) or labels (object)")
    unknown = set(reference) - set(CHEXPERT_OBSERVATIONS)
    if unknown:
        raise InputError(f"record {record['id']}: unknown findings in reference labels: {sorted(unknown)}")
    where = f"record {record['id']} reference"
    return [label_files.parse_label_cell("" if reference.get(o) is None else str(reference[o]), where)
            for o in CHEXPERT_OBSERVATIONS]


def _reference_text(record):
    return record["reference"] if isinstance(record["reference"], str) else ""


def _rows(rows):
    return np.array(rows, dtype=np.float64).reshape(-1, len(CHEXPERT_OBSERVATIONS))


def _label_counts(labels) -> dict:
    """{finding: {"positive", "negative", "uncertain", "not_mentioned"}}, as the paper's supplement tabulates."""
    counts = {}
    for j, finding in enumerate(CHEXPERT_OBSERVATIONS):
        column = labels[:, j]
        counts[finding] = {
            "positive": int((column == 1).sum()),
            "negative": int((column == 0).sum()),
            "uncertain": int((column == -1).sum()),
            "not_mentioned": int(np.isnan(column).sum()),
        }
    return counts
