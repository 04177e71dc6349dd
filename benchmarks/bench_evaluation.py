"""Evaluation speed: reports labeled per second, and the bootstrap for 3,000 reports x 14 findings x 1,000 samples;
the labeler's agreement with NegBio's hand-made labels of 3,851 real Open-i reports (positive findings) and how
many of its labels are positive / negative / uncertain there per observation; and its agreement, label by label,
with every output of the real CheXpert labeler this project has (its published samples and the outputs on real
reports in its issue tracker: tests/fixtures/chexpert-labeler-*).

Prints the figures and writes benchmarks/results/evaluation.json (with the load average: the machine is shared).
"""

import json
import os
import pathlib
import platform
import random
import subprocess
import tempfile
import time

import numpy as np

from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS, NEGATIVE, POSITIVE, UNCERTAIN
from cxrllava_jax.domain.label_files import read_labels_csv
from cxrllava_jax.domain.labeler import ReportLabeler
from cxrllava_jax.evaluation import labeler_devset
from cxrllava_jax.evaluation.metrics import score_labels
from cxrllava_jax.reference.wheels import torchxrayvision_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "evaluation.json"
GOLD = ROOT / "tests" / "fixtures" / "openi-negbio-gold" / "openi_gld_std14.csv"
CHEXPERT_OUTPUTS = [ROOT / "tests" / "fixtures" / d / "labeled_reports.csv"
                    for d in ("chexpert-labeler-samples", "chexpert-labeler-outputs")]

# Sentences in the style of MIMIC-CXR / Indiana findings and impressions; a report draws one per topic.
TOPICS = (
    ("Heart size is normal.", "The heart is mildly enlarged.", "Moderate cardiomegaly.", "Heart size is top normal.",
     "The cardiomediastinal silhouette is within normal limits."),
    ("The lungs are clear.", "No focal consolidation, pleural effusion, or pneumothorax.",
     "Patchy opacity in the right lower lobe may represent pneumonia in the appropriate clinical setting.",
     "Bibasilar atelectasis.", "Mild pulmonary vascular congestion without overt edema.",
     "Left basilar opacity likely reflects atelectasis, although consolidation cannot be excluded."),
    ("There is a small right pleural effusion.", "No pleural effusion.", "Small bilateral pleural effusions.",
     "Blunting of the left costophrenic angle is unchanged.", "No pneumothorax is identified."),
    ("", "Endotracheal tube terminates 4 cm above the carina.", "Right PICC line tip in the mid SVC.",
     "Nasogastric tube courses below the diaphragm, tip not seen.", "Dual lead pacemaker is unchanged."),
    ("", "No acute osseous abnormality.", "Healed right rib fractures.", "Degenerative changes of the thoracic spine."),
    ("IMPRESSION: No acute cardiopulmonary process.", "IMPRESSION: Mild cardiomegaly with small effusions.",
     "IMPRESSION: Findings concerning for pneumonia.", "IMPRESSION: 2 cm nodule in the right upper lobe."),
)


def synthetic_reports(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(s for s in (rng.choice(topic) for topic in TOPICS) if s) for _ in range(n)]


def timed_labeling(reports):
    """(labels, seconds) from a new labeler: regexes compiled outside the timing, its clause cache empty."""
    labeler = ReportLabeler()
    start = time.perf_counter()
    labels = labeler.label_many(reports)
    return labels, time.perf_counter() - start


def bench_labeler(n=5000):
    """Synthetic reports draw from a few dozen sentences, so most clauses hit the labeler's cache; the Open-i
    figure (real reports, two clauses in three repeated) is the one to quote."""
    reports = synthetic_reports(n)
    _, seconds = timed_labeling(reports)
    return {"reports": n, "seconds": seconds, "reports_per_second": n / seconds,
            "mean_report_chars": sum(map(len, reports)) / n}


def bench_bootstrap(n=3000, samples=1000):
    rng = np.random.default_rng(0)
    reference = rng.choice([1.0, 0.0, -1.0, np.nan], size=(n, 14), p=[0.3, 0.4, 0.05, 0.25])
    predicted = np.where(rng.random((n, 14)) < 0.8, reference, rng.choice([1.0, 0.0, np.nan], size=(n, 14)))
    score_labels(reference[:100], predicted[:100], bootstrap_samples=10)
    start = time.perf_counter()
    score_labels(reference, predicted, bootstrap_samples=samples, seed=0)
    return {"reports": n, "findings": 14, "samples": samples, "seconds": time.perf_counter() - start}


def bench_devset():
    """Positive-finding agreement on the Open-i development set, and labeling speed on its real reports."""
    with tempfile.TemporaryDirectory() as root:
        (pathlib.Path(root) / "NLMCXR_reports.tgz").write_bytes(torchxrayvision_data()("NLMCXR_reports.tgz"))
        devset = labeler_devset.load(GOLD, root)
    labels, seconds = timed_labeling(devset.reports)
    counts = {o: {name: int((labels[:, j] == value).sum())
                  for name, value in (("positive", POSITIVE), ("negative", NEGATIVE), ("uncertain", UNCERTAIN))}
              for j, o in enumerate(CHEXPERT_OBSERVATIONS)}
    return {"reports": len(devset.reports), "reports_per_second": len(devset.reports) / seconds,
            "mean_report_chars": sum(map(len, devset.reports)) / len(devset.reports),
            "positive": labeler_devset.score_positive(labels, devset.gold), "label_counts": counts}


def bench_chexpert_outputs():
    """Labels (14 per report, not mentioned included) equal to the real CheXpert labeler's, per observation."""
    tables = [read_labels_csv(path) for path in CHEXPERT_OUTPUTS]
    reports = [r for t in tables for r in t.reports]
    theirs = np.concatenate([t.labels for t in tables])
    ours = ReportLabeler().label_many(reports)
    same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))
    return {"reports": len(reports), "labels": int(same.size), "labels_equal": int(same.sum()),
            "per_observation": {o: int(same[:, j].sum()) for j, o in enumerate(CHEXPERT_OBSERVATIONS)},
            "differing": [{"report": int(i), "observation": CHEXPERT_OBSERVATIONS[j], "chexpert": _cell(theirs[i, j]),
                           "ours": _cell(ours[i, j])} for i, j in zip(*np.nonzero(~same))]}


def _cell(value):
    return None if np.isnan(value) else float(value)


def main():
    machine = {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
               "load_average": os.getloadavg()}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    results = {"labeler": bench_labeler(), "bootstrap": bench_bootstrap(), "openi_devset": bench_devset(),
               "chexpert_outputs": bench_chexpert_outputs(), "commit": commit.strip(), "machine": machine}
    labeler, bootstrap, devset, chexpert = (results[k] for k in ("labeler", "bootstrap", "openi_devset",
                                                                 "chexpert_outputs"))
    print(f"labeler: {labeler['reports_per_second']:.0f} reports/s ({labeler['reports']} synthetic reports of "
          f"repeated sentences, {labeler['mean_report_chars']:.0f} characters on average)")
    print(f"bootstrap: {bootstrap['seconds']:.2f} s for {bootstrap['reports']} reports x 14 findings x "
          f"{bootstrap['samples']} samples (full score_labels)")
    print(f"Open-i development set: {devset['reports']} real reports ({devset['mean_report_chars']:.0f} characters on "
          f"average), {devset['reports_per_second']:.0f} reports/s; positive findings against NegBio's gold labels:")
    for observation, s in devset["positive"].items():
        print(f"  {observation:18s} gold {s['gold']:5d}  precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
              f"F1 {s['f1']:.3f}")
    print("  our labels on Open-i, positive / negative / uncertain:")
    for observation, c in devset["label_counts"].items():
        print(f"  {observation:26s} {c['positive']:5d} {c['negative']:5d} {c['uncertain']:5d}")
    print(f"the real CheXpert labeler's outputs ({chexpert['reports']} reports): {chexpert['labels_equal']} of "
          f"{chexpert['labels']} labels equal; differing: {chexpert['differing']}")
    print(f"load average {machine['load_average']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
