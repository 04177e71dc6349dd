"""Metrics the tasks report, as clu metrics: averages of per-batch outputs, and AUROC over a whole split."""

import numpy as np
from clu import metrics
from scipy.stats import rankdata


def auroc(scores, labels) -> float:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties get average ranks)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def averages(*names: str, **others) -> type[metrics.Collection]:
    """A clu Collection of the named per-batch outputs' averages, plus the metrics in `others`."""
    return metrics.Collection.create(**{name: metrics.Average.from_output(name) for name in names}, **others)


@metrics.flax.struct.dataclass
class AUROC(metrics.CollectingMetric.from_outputs(("probability", "label"))):
    """Collects every example's probability and label (on the host: not inside jit) and ranks them at the end."""

    def compute(self):
        values = super().compute()
        return auroc(values["probability"], values["label"])
