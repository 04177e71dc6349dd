"""Evaluation entry point: the paper's Tables 2-4 for a checkpoint, for texts generated elsewhere, or for two
label files.

  python eval.py --config=configs/eval_mimic.py --checkpoint=CKPT --data_dir=DATA --workdir=DIR
  python eval.py --config=configs/eval_mimic.py --predictions=PRED.jsonl --workdir=DIR
  python eval.py --config=configs/eval_mimic.py --predictions=REPORT.jsonl --references=REFS.csv --workdir=DIR
  python eval.py --config=configs/eval_mimic.py --reference_labels=REF.csv --predicted_labels=PRED.csv --workdir=DIR

Reports are labeled by --labeler: ours (default), chexpert-csv (--labels_csv: the CheXpert labeler's or CheXbert's
output for every report text) or chexbert (--chexbert_checkpoint: chexbert.pth, run with the f1chexbert package).
"""

from absl import flags
from ml_collections import config_flags

from cxrllava_jax import arguments, errors, files
from cxrllava_jax.evaluation import labelers, model_metrics

_CONFIG = config_flags.DEFINE_config_file("config", None, "an evaluation config (configs/eval_*.py)", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "our checkpoint or a release-layout PyTorch directory")
_ADAPTER = flags.DEFINE_string("adapter", None, "a LoRA adapter directory (PEFT format) applied to --checkpoint")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "the test set as published (read by config.dataset's adapter)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "images per generation batch")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "JSONL of {id, generated, reference} records, or "
                                   "`cxrllava report --jsonl` output (with --references)")
_REFERENCES = flags.DEFINE_string("references", None, "with --predictions from `cxrllava report`: CSV of image, report "
                                  "(or image + the 14 observations for config.answer_kind=json_labels)")
_METRICS = flags.DEFINE_string("metrics", None, "model-based metrics to add, any of "
                               f"{','.join(model_metrics.METRICS)} (pip install 'cxrllava-jax[metrics]'; weights from "
                               "the Hugging Face cache)")
_LIMIT = flags.DEFINE_integer("limit", None, "score only the first N images (a quick look at a checkpoint)")
_REFERENCE_LABELS = flags.DEFINE_string("reference_labels", None, "reference label CSV (CheXpert labeler format)")
_PREDICTED_LABELS = flags.DEFINE_string("predicted_labels", None, "predicted label CSV (CheXpert labeler format)")
_LABELER = flags.DEFINE_enum("labeler", "ours", labelers.CHOICES, "what labels the report texts")
_LABELS_CSV = flags.DEFINE_string("labels_csv", None, "--labeler=chexpert-csv: labels of every report text")
_CHEXBERT_CHECKPOINT = flags.DEFINE_string("chexbert_checkpoint", None, "--labeler=chexbert: CheXbert's chexbert.pth")
_WORKDIR = flags.DEFINE_string("workdir", None, "where answers, labels, tables and results.json are written")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace the results of an earlier evaluation in --workdir")
arguments.define_absl_flags(required=("config", "workdir"), directory="workdir")


def main(_argv):
    from cxrllava_jax.evaluation import run  # here, not above: `--help` answers before the metrics' imports
    if _BATCH_SIZE.value < 1:
        raise errors.UsageError(f"--batch_size={_BATCH_SIZE.value}: give at least 1 image per batch")
    if _LIMIT.value is not None and _LIMIT.value < 1:
        raise errors.UsageError(f"--limit={_LIMIT.value}: give at least 1 image")
    if _REFERENCES.value and not _PREDICTIONS.value:
        raise errors.UsageError("--references goes with --predictions (a `cxrllava report --jsonl` file)")
    metric_names = model_metrics.parse(_METRICS.value, run.checked_answer_kind(_CONFIG.value))
    model_metrics.check(metric_names)  # before any generation: a run should not end in a refusal
    with files.staged_directory(_WORKDIR.value, _OVERWRITE.value, owns=run.OUTPUTS) as staging:  # swapped in whole
        evaluate(staging, metric_names)
    print(files.read_text(f"{_WORKDIR.value}/table.md"))


def evaluate(workdir, metric_names):
    from cxrllava_jax.evaluation import run
    if _REFERENCE_LABELS.value and _PREDICTED_LABELS.value:
        if metric_names:
            raise errors.UsageError("--metrics compares report texts; label files have none")
        run.evaluate_label_files(_CONFIG.value, _REFERENCE_LABELS.value, _PREDICTED_LABELS.value, workdir)
        return
    report_labeler = labelers.make(_LABELER.value, _LABELS_CSV.value, _CHEXBERT_CHECKPOINT.value)
    if _CHECKPOINT.value:
        if not _DATA_DIR.value:
            raise errors.UsageError("--checkpoint needs --data_dir (the test set)")
        run.evaluate_model(_CONFIG.value, _CHECKPOINT.value, _DATA_DIR.value, workdir, _BATCH_SIZE.value,
                           adapter=_ADAPTER.value, report_labeler=report_labeler, limit=_LIMIT.value,
                           metric_names=metric_names)
    elif _PREDICTIONS.value:
        run.evaluate_predictions(_CONFIG.value, _PREDICTIONS.value, workdir, report_labeler, _REFERENCES.value,
                                 _LIMIT.value, metric_names)
    else:
        raise errors.UsageError("give --checkpoint and --data_dir, --predictions, or both label files")


if __name__ == "__main__":
    arguments.run_absl("eval.py", main, configs=("eval_*.py",), renamed_keys={"task": "answer_kind"})
