"""`eval.py --checkpoint`: a model answers for a test split read by a dataset adapter, and the answers are scored."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrllava_jax.domain import prompting
from cxrllava_jax.evaluation import run
from cxrllava_jax.inference.api import TextStream
from cxrllava_jax.reference.tiny_models import checkpoint_dir
from input_pipeline import mimic, synthetic

ROOT = Path(__file__).parents[1]
REPORT = [{"role": "user", "content": prompting.REPORT_PROMPT}]
pytestmark = pytest.mark.slow


def test_eval_py_generates_with_a_checkpoint_then_rescores_its_answers(model, tmp_path):
    data = tmp_path / "synthetic"
    synthetic.write_dataset(data, 40, image_size=64, seed=5)
    test_split = mimic.load(data, "test")[:5]
    common = ["--config=configs/eval_mimic.py", "--config.dataset=synthetic", "--config.bootstrap_samples=50",
              "--config.min_class_count=1"]
    completed = subprocess.run(
        [sys.executable, "eval.py", *common, f"--checkpoint={checkpoint_dir()}", f"--data_dir={data}",
         "--batch_size=3", "--limit=5", f"--workdir={tmp_path / 'model'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "the paper's Table 2" in completed.stdout and "MIMIC internal test set" not in completed.stdout
    assert "generating: 100%" in completed.stderr  # the progress bar, also when stderr is not a terminal

    generated = [json.loads(line) for line in open(tmp_path / "model" / "generated.jsonl")]
    assert [g["id"] for g in generated] == [str(Path(r.image).relative_to(data)) for r in test_split]
    assert [g["reference"] for g in generated] == [r.report for r in test_split]
    # Each answer is the Python API's greedy report of its image: checked on the first and the last record (in
    # different batches there) over 16 tokens, the text they settle (TextStream's) or the whole answer if it ended.
    for g, record in ((generated[0], test_split[0]), (generated[-1], test_split[-1])):
        (_, start), = model.iter_generate([REPORT], [record.image], temperature=0.0, max_new_tokens=16)
        if start.completion.finish_reason == "stop":
            assert g["generated"] == start.text
        else:
            pieces = []
            TextStream(model.tokenizer, pieces.append)(start.completion.tokens)
            assert pieces and g["generated"].startswith("".join(pieces))
    for name in ("reference_labels.csv", "predicted_labels.csv", "table.md", "table.csv", "results.json"):
        assert (tmp_path / "model" / name).is_file(), name

    # The same answers, scored again without the model, give the same results.
    config = run.default_config()
    config.update(dataset="synthetic", bootstrap_samples=50, min_class_count=1)
    again = run.evaluate_predictions(config, tmp_path / "model" / "generated.jsonl", tmp_path / "rescored")
    first = json.loads((tmp_path / "model" / "results.json").read_text())
    assert json.loads(json.dumps(again["result"])) == first["result"]


def test_a_split_without_references_is_refused(tmp_path):
    data = tmp_path / "synthetic"
    synthetic.write_dataset(data, 10, image_size=64, seed=5)
    config = run.default_config()
    config.update(dataset="synthetic", split="no_such_split")
    with pytest.raises(ValueError, match="no records with a reference"):
        run.evaluate_model(config, checkpoint_dir(), data, tmp_path / "out")
