"""Evaluation speed: reports labeled per second, and the bootstrap for 3,000 reports x 14 findings x 1,000 samples.

Prints the figures and writes benchmarks/results/evaluation.json.
"""

import json
import pathlib
import platform
import random
import time

import numpy as np

from cxrllava_jax.domain.labeler import label_reports
from cxrllava_jax.evaluation.metrics import score_labels

RESULTS = pathlib.Path(__file__).parent / "results" / "evaluation.json"

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


def bench_labeler(n=5000):
    reports = synthetic_reports(n)
    label_reports(reports[:50])  # compile the regexes outside the timing
    start = time.perf_counter()
    label_reports(reports)
    seconds = time.perf_counter() - start
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


def main():
    machine = {"python": platform.python_version(), "processor": platform.processor() or platform.machine()}
    results = {"labeler": bench_labeler(), "bootstrap": bench_bootstrap(), "machine": machine}
    labeler, bootstrap = results["labeler"], results["bootstrap"]
    print(f"labeler: {labeler['reports_per_second']:.0f} reports/s "
          f"({labeler['reports']} synthetic reports, {labeler['mean_report_chars']:.0f} characters on average)")
    print(f"bootstrap: {bootstrap['seconds']:.2f} s for {bootstrap['reports']} reports x 14 findings x "
          f"{bootstrap['samples']} samples (full score_labels)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
