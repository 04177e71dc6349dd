"""Evaluation speed: reports labeled per second, and the bootstrap for 3,000 reports x 14 findings x 1,000 samples;
and the labeler's agreement with NegBio's hand-made labels of 3,851 real Open-i reports (positive findings).

Prints the figures and writes benchmarks/results/evaluation.json (with the load average: the machine is shared).
"""

import json
import os
import pathlib
import platform
import random
import tempfile
import time

import numpy as np

from cxrllava_jax.domain.labeler import ReportLabeler
from cxrllava_jax.evaluation import labeler_devset
from cxrllava_jax.evaluation.metrics import score_labels
from cxrllava_jax.reference.wheels import torchxrayvision_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "evaluation.json"
GOLD = ROOT / "tests" / "fixtures" / "openi-negbio-gold" / "openi_gld_std14.csv"

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
    return {"reports": len(devset.reports), "reports_per_second": len(devset.reports) / seconds,
            "mean_report_chars": sum(map(len, devset.reports)) / len(devset.reports),
            "positive": labeler_devset.score_positive(labels, devset.gold)}


def main():
    machine = {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
               "load_average": os.getloadavg()}
    results = {"labeler": bench_labeler(), "bootstrap": bench_bootstrap(), "openi_devset": bench_devset(),
               "machine": machine}
    labeler, bootstrap, devset = results["labeler"], results["bootstrap"], results["openi_devset"]
    print(f"labeler: {labeler['reports_per_second']:.0f} reports/s ({labeler['reports']} synthetic reports of "
          f"repeated sentences, {labeler['mean_report_chars']:.0f} characters on average)")
    print(f"bootstrap: {bootstrap['seconds']:.2f} s for {bootstrap['reports']} reports x 14 findings x "
          f"{bootstrap['samples']} samples (full score_labels)")
    print(f"Open-i development set: {devset['reports']} real reports ({devset['mean_report_chars']:.0f} characters on "
          f"average), {devset['reports_per_second']:.0f} reports/s; positive findings against NegBio's gold labels:")
    for observation, s in devset["positive"].items():
        print(f"  {observation:18s} gold {s['gold']:5d}  precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
              f"F1 {s['f1']:.3f}")
    print(f"load average {machine['load_average']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
