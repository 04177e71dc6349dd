"""`make demo`: the whole method end to end on the embedded synthetic dataset, tiny sizes, on CPU.

    python demo.py --workdir=demo_workdir

1. generate the synthetic CXR dataset (MIMIC-CXR-JPG layout) and a small LLaMA-style tokenizer;
2. train the five stages in order (1A classifier, 1B contrastive on label keywords then on reports,
   2A projector alignment, 2B instruction tuning), each starting from the previous stage's model;
3. write reports for the held-out test split with the final model, label them and the ground-truth
   reports with our CheXpert-style labeler, and score them as the paper does (Table 2's protocol);
4. fine-tune that model on synthetic prior/current studies twice, the same data and steps: reading the study
   (current frontal and lateral, prior frontal and its report) and, the baseline, the current frontal alone;
   score the change statements ("new", "resolved", ...) of each one's reports on the held-out studies;
5. print the table, one generated report with a follow-up question, both change scores, write `summary.json`.
The same code paths as the full-size stages; only the sizes (configs/demo.py) shrink. An entry point like
train.py, beside the configs/ it reads: `python path/to/demo.py` runs from any directory.
"""

import argparse
import json
import time
from pathlib import Path

from configs import demo as demo_configs
from cxrllava_jax import files
from cxrllava_jax.evaluation import run as evaluation
from cxrllava_jax.domain import prompting
from cxrllava_jax.inference.api import CXRLLaVA
from cxrllava_jax.domain.tokenizer import train_tokenizer
from cxrllava_jax.training import stages
from cxrllava_jax.training.loop import train_and_evaluate
from input_pipeline import conversations, mimic, synthetic
from input_pipeline.records import image_paths

# What the demo must show to count as learned (the training issue's bar).
REQUIRED = {"stage1a_validation_auroc": 0.90, "report_micro_f1": 0.70}
# The studies issue's goal for the study fine-tune: change statements right on >= 80% of the held-out findings that
# changed, reported beside the single-image baseline's. Met with seeds 0 and 1 (0.805 against 0.461; 0.814 against
# 0.500), by a few findings of the ~250 that changed, so it is reported (`goal_met`) but does not fail the demo:
# another CPU's arithmetic can move a tiny model's 1,200 steps by that much (the same recipe at 900 steps: 0.763).
STUDY_GOAL = 0.80


def prepare_data(workdir: Path, num_studies: int = demo_configs.NUM_STUDIES, seed: int = 0):
    """The synthetic dataset, the study set and a tokenizer where the demo configs of the chain under `workdir` read
    them."""
    cfg = demo_configs.get_config("2b", root=str(workdir))
    data_dir, tokenizer_dir = Path(cfg.data.data_dir), Path(cfg.data.tokenizer)
    image_size, vocab_size = demo_configs.IMAGE_SIZE, demo_configs.VOCAB_SIZE
    studies = synthetic.write_dataset(data_dir, num_studies, image_size, seed, overwrite=True)  # a rerun: same bytes
    num_pairs = num_studies * demo_configs.NUM_STUDY_PAIRS // demo_configs.NUM_STUDIES  # scales with --num-studies
    pairs = synthetic.write_studies(demo_configs.study_data_dir(workdir), num_pairs, image_size, seed, overwrite=True)
    texts = [s.report for s in studies] + [turn["content"] for s in studies for c in s.conversations for turn in c]
    texts += [prompting.SYSTEM_PROMPT, prompting.REPORT_PROMPT, prompting.DIFFERENTIAL_PROMPT]
    # The study step's words ("resolved", "increased from", "Prior study"...) as whole tokens, not letters.
    texts += [p.report for p in pairs] + [p.prior_report for p in pairs]
    with open(Path(demo_configs.study_data_dir(workdir)) / "studies-train.jsonl") as lines:
        texts.append(json.loads(lines.readline())["conversations"][0]["value"])  # a study prompt's template
    train_tokenizer(texts, vocab_size, tokenizer_dir)
    return data_dir, tokenizer_dir


def train_stages(workdir: Path, steps: int | None = None) -> dict:
    """Every stage of the chain in order, each from the previous one's model; {stage: its summary}."""
    summaries = {}
    for stage in stages.NAMES:
        print(f"[demo] stage {stage}", flush=True)
        cfg = demo_configs.get_config(stage, root=str(workdir))
        if steps:
            cfg.num_train_steps = steps
        summaries[stage] = train_and_evaluate(cfg, stages.run_dir(workdir, stage))
    return summaries


def study_step(workdir: Path, steps: int | None = None) -> dict:
    """Both study fine-tunes (configs/demo.py STUDY_RUNS) and their change statements on the held-out studies:
    {run: evaluation.changes' scores}; each run's reports and evaluation are in workdir/eval_<run>/."""
    config = evaluation_config()
    config.dataset, config.bootstrap_samples = "synthetic studies", 50
    scores = {}
    for run in demo_configs.STUDY_RUNS:
        print(f"[demo] fine-tuning on synthetic studies: {run}", flush=True)
        run_dir = Path(demo_configs.study_run_dir(workdir, run))
        cfg = demo_configs.get_config(run, root=str(workdir))
        if steps:
            cfg.num_train_steps = steps
        train_and_evaluate(cfg, run_dir)
        model = CXRLLaVA.from_pretrained(run_dir / "model")
        records = study_reports(model, Path(demo_configs.study_data_dir(workdir)) / f"{run}-test.jsonl")
        results = evaluation.evaluate_records(config, records, workdir / f"eval_{run}")
        files.write_text_atomically(workdir / f"eval_{run}" / "generated.jsonl",
                                    "".join(json.dumps(r) + "\n" for r in records))
        scores[run] = results["change_statements"]
    return scores


def study_reports(model: CXRLLaVA, path: Path) -> list[dict]:
    """Greedy reports for every conversation of a study file (its first turn, about all its images): {id,
    generated, reference} records."""
    records = conversations.load(path)
    answers = model.iter_generate([r.conversations[0][:1] for r in records],
                                  [list(image_paths(r.image)) for r in records], batch_size=50, keep=False,
                                  temperature=0.0)
    generated = {index: answer.text for index, answer in answers}
    return [{"id": r.origin, "generated": generated[i], "reference": r.report} for i, r in enumerate(records)]


def evaluation_config():
    """Table 2's protocol (reports labeled on both sides, the paper's exclusions) on the synthetic test split."""
    config = evaluation.default_config()
    config.dataset, config.split, config.bootstrap_samples = "synthetic", "test", 200
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_workdir", type=Path)
    parser.add_argument("--num-studies", type=int, default=demo_configs.NUM_STUDIES)
    parser.add_argument("--steps", type=int, default=None, help="override every stage's number of steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workdir = args.workdir.absolute()
    started = time.perf_counter()
    print(f"[demo] synthetic dataset: {args.num_studies} studies at {demo_configs.IMAGE_SIZE} px in "
          f"{workdir / 'data'}")
    data_dir, _ = prepare_data(workdir, args.num_studies, args.seed)
    summaries = train_stages(workdir, args.steps)
    print("[demo] evaluation: reports for the synthetic test split", flush=True)
    model = CXRLLaVA.from_pretrained(stages.run_dir(workdir, stages.NAMES[-1]) / "model")
    results = evaluation.evaluate_model(evaluation_config(), None, data_dir, workdir / "eval", batch_size=50,
                                        model=model)
    print((workdir / "eval" / "table.md").read_text())

    example = mimic.load(data_dir, "test")[0]
    # At most half the tiny model's 512-token context, so that the follow-up always fits (`--steps 1` writes until
    # its budget ends).
    report = model.write_radiologic_report(example.image, temperature=0.0, max_new_tokens=256)
    messages = [{"role": "user", "content": prompting.REPORT_PROMPT}, {"role": "assistant", "content": report},
                {"role": "user", "content": "Is there any abnormality on this radiograph?"}]
    answer = model.chat(messages, example.image, temperature=0.0)
    print(f"[demo] study {example.study_id}\n--- ground truth ---\n{example.report}\n--- generated ---\n{report}\n"
          f"--- follow-up: Is there any abnormality on this radiograph? ---\n{answer}")
    study_started = time.perf_counter()
    changes = study_step(workdir, args.steps)
    study_seconds = round(time.perf_counter() - study_started, 1)
    for run, scored in changes.items():
        kinds = ", ".join(f"{c} {v['accuracy']:.2f} of {v['count']}" for c, v in scored["per_change"].items()
                          if v["count"])
        print(f"[demo] change statements, {run}: {scored['changed_accuracy'] or 0.0:.3f} right of {scored['changed']} "
              f"findings that changed ({scored['accuracy'] or 0.0:.3f} of all {scored['statements']}; {kinds})")

    measured = {"stage1a_validation_auroc": _best_auroc(stages.run_dir(workdir, "1a")),
                "report_micro_f1": _micro_f1(results["result"])}
    study_accuracy = changes["studies"]["changed_accuracy"] or 0.0  # None: no reference stated a change
    summary = {
        "measured": measured, "required": REQUIRED,
        "passed": all(measured[k] is not None and measured[k] >= v for k, v in REQUIRED.items()),
        "stages": summaries, "evaluation": {k: results[k] for k in ("dataset", "split", "result")},
        "example": {"study_id": example.study_id, "reference": example.report, "generated": report,
                    "follow_up_answer": answer},
        "change_statements": {"held_out": "study_data/studies-test.jsonl", **changes, "goal": STUDY_GOAL,
                              "goal_met": study_accuracy >= STUDY_GOAL, "seconds": study_seconds},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    files.write_text_atomically(workdir / "summary.json", json.dumps(summary, indent=2))
    for name, value in measured.items():
        shown = "not measured (this run is too short or too small to score)" if value is None else f"{value:.3f}"
        print(f"[demo] {name} = {shown} (required >= {REQUIRED[name]})")
    print(f"[demo] study change statements right on findings that changed = {study_accuracy:.3f}, single-image "
          f"baseline {changes['single']['changed_accuracy'] or 0.0:.3f} (goal >= {STUDY_GOAL}: "
          f"{'met' if study_accuracy >= STUDY_GOAL else 'NOT met'})")
    print(f"[demo] {'PASSED' if summary['passed'] else 'FAILED'} in {summary['wall_seconds']:.0f} s; "
          f"summary in {workdir / 'summary.json'}")
    return 0 if summary["passed"] else 1


def _micro_f1(result: dict) -> float | None:
    """The report micro-F1 over the findings scored; None when the exclusion rules left none (a tiny run)."""
    average = result["averages"].get("Average")
    return average["micro"]["f1"] if average else None


def _best_auroc(stage_dir: Path) -> float | None:
    """The stage 1A validation AUROC of the exported (best by validation loss) step; None (which fails the check,
    and says why) when the run was too short to evaluate, e.g. `--steps 3`."""
    evals = [json.loads(line) for line in open(stage_dir / "metrics.jsonl") if '"split": "eval"' in line]
    best = json.loads((stage_dir / "summary.json").read_text())["best_step"]
    chosen = [e for e in evals if e["step"] == best] or evals[-1:]
    return chosen[-1]["auroc"] if chosen else None


if __name__ == "__main__":
    raise SystemExit(main())
