"""Per-finding precision / recall / F1 between reference and predicted labels, micro and macro averages,
percentile-bootstrap confidence intervals, and the paper's rules for leaving findings out.

Which pairs count, for each finding (`LabelPolicy`):
- The reference decides inclusion. Positive and negative reference labels count. A reference that does not
  mention the finding is left out (`missing_reference="exclude"`, the paper: its label counts, e.g. 255 negative
  and 756 positive Cardiomegaly among 3,000 MIMIC reports, are of mentioned labels only), or read as negative
  (`"negative"`, the CheXbert-style convention of the report-generation literature).
- A prediction that does not mention the finding is negative: the generated report did not report it. Leaving
  such pairs out would reward a model for saying nothing.
- Uncertain labels, on either side: `uncertain="exclude"` drops the pair (the paper: "we excluded all uncertain
  labels"); `"positive"` (CheXbert-style) and `"negative"` map them to that class.

The paper's "average" is the micro average, F1 of the counts pooled over the included findings (see
`paper_check`); the macro average (mean of per-finding F1) is reported beside it. Bootstrap samples resample
reports, so the findings of one report stay together and the averages' intervals see their correlation.

Beside the paper's protocol, `standard_aggregates` gives the figures report-generation papers and ReXrank print,
"F1-14" and "F1-5", computed as the f1chexbert package (its "rrg" mode) and RadEval compute CheXbert F1: every
report counts for every finding; a label is 1 when positive or uncertain, 0 when negative or not mentioned; no
finding is excluded; F1-14 averages the 14 observations (No Finding included), F1-5 the five of the CheXpert
competition; micro = F1 of the pooled counts, macro = the mean of per-finding F1 (0 for a finding with no positive
on either side, as scikit-learn's classification_report, which those packages call, gives it).
"""

import dataclasses

import numpy as np

from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS, POSITIVE, UNCERTAIN
from cxrllava_jax.errors import ConfigError, InputError, MismatchError

LABEL_POLICY_CHOICES = {"uncertain": ("exclude", "positive", "negative"), "missing_reference": ("exclude", "negative")}


@dataclasses.dataclass(frozen=True)
class LabelPolicy:
    uncertain: str = "exclude"
    missing_reference: str = "exclude"

    def __post_init__(self):
        for field, choices in LABEL_POLICY_CHOICES.items():
            if getattr(self, field) not in choices:
                raise ConfigError(f"LabelPolicy.{field}={getattr(self, field)!r}: expected one of {choices}")


@dataclasses.dataclass(frozen=True)
class ExclusionRules:
    """A finding is left out when either reference class has fewer than `min_class_count` pairs or a share below
    `min_class_fraction`, or when it is always left out. The paper applies both thresholds on MIMIC and CheXpert
    (Tables 2, 3) but only the count on Indiana (Table 4 keeps Pneumothorax at 27 of 1,454 = 1.9% positive)."""

    min_class_count: int = 10
    min_class_fraction: float = 0.05
    always_excluded: tuple = ("No Finding", "Enlarged Cardiomediastinum")


# The field's convention (see the module docstring), applied to labels from any labeler.
STANDARD_FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
STANDARD_AVERAGES = {"F1-14": None, "F1-5": STANDARD_FIVE}
STANDARD_POLICY = LabelPolicy(uncertain="positive", missing_reference="negative")
STANDARD_RULES = ExclusionRules(min_class_count=0, min_class_fraction=0.0, always_excluded=())

_WHY_ALWAYS_EXCLUDED = {
    "No Finding": "not a pathology; none of the paper's tables reports it",
    "Enlarged Cardiomediastinum": "overlaps with Cardiomegaly (paper, notes to Tables 2-4)",
}


@dataclasses.dataclass
class Score:
    """Precision, recall and F1 with their (low, high) bootstrap intervals and the counts behind them."""

    precision: float
    recall: float
    f1: float
    precision_ci: tuple
    recall_ci: tuple
    f1_ci: tuple
    tp: int
    fp: int
    fn: int


@dataclasses.dataclass
class FindingResult:
    finding: str
    n: int  # pairs that count
    positives: int  # among them, positive in the reference
    score: Score


@dataclasses.dataclass
class EvaluationResult:
    findings: list  # FindingResult of each included finding, in CHEXPERT_OBSERVATIONS order
    excluded: dict  # finding -> why it was left out
    averages: dict  # average name -> {"micro": Score, "macro": Score}
    n_reports: int
    policy: LabelPolicy
    rules: ExclusionRules
    bootstrap_samples: int
    seed: int
    confidence: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pair_outcomes(reference, predicted, policy: LabelPolicy):
    """(truth, called, counted): boolean (n, 14) arrays; a pair is scored only where `counted`."""
    reference, predicted = np.asarray(reference, np.float64), np.asarray(predicted, np.float64)
    if reference.shape != predicted.shape or reference.ndim != 2 or reference.shape[1] != len(CHEXPERT_OBSERVATIONS):
        raise MismatchError(f"reference labels {reference.shape} and predicted labels {predicted.shape}: expected two "
                            f"(n_reports, {len(CHEXPERT_OBSERVATIONS)}) arrays")
    ref_missing, ref_uncertain = np.isnan(reference), reference == UNCERTAIN
    pred_uncertain = predicted == UNCERTAIN
    truth = (reference == POSITIVE) | (ref_uncertain & (policy.uncertain == "positive"))
    called = (predicted == POSITIVE) | (pred_uncertain & (policy.uncertain == "positive"))
    counted = ~(ref_missing & (policy.missing_reference == "exclude"))
    if policy.uncertain == "exclude":
        counted &= ~ref_uncertain & ~pred_uncertain
    return truth, called, counted


def exclusions(truth, counted, rules: ExclusionRules) -> dict:
    """{finding: reason} for the findings the rules leave out, judged on the counted reference labels."""
    positives = (truth & counted).sum(0)
    negatives = (~truth & counted).sum(0)
    reasons = {}
    for j, finding in enumerate(CHEXPERT_OBSERVATIONS):
        n, pos, neg = int(positives[j] + negatives[j]), int(positives[j]), int(negatives[j])
        if finding in rules.always_excluded:
            why = _WHY_ALWAYS_EXCLUDED.get(finding, "always left out by the configuration")
            reasons[finding] = f"{why} (setting always_excluded)"
        elif min(pos, neg) < rules.min_class_count:
            reasons[finding] = (f"fewer than {rules.min_class_count} in a class ({pos} positive, {neg} negative; "
                                f"setting min_class_count)")
        elif n and min(pos, neg) / n < rules.min_class_fraction:
            reasons[finding] = (f"a class under {rules.min_class_fraction:.0%} ({pos} positive, {neg} negative of {n}; "
                                f"setting min_class_fraction)")
    return reasons


def bootstrap_weights(n_reports, samples, seed) -> np.ndarray:
    """(samples, n_reports): how often each report is drawn in each resample (rows sum to n_reports)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_reports, size=(samples, n_reports))
    flat = (draws + np.arange(samples)[:, None] * n_reports).ravel()
    return np.bincount(flat, minlength=samples * n_reports).reshape(samples, n_reports).astype(np.float64)


def precision_recall_f1(tp, fp, fn):
    """Elementwise; a ratio with a zero denominator is 0 (no positive call, or no positive reference)."""
    tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
    return _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)


def score_labels(
    reference,
    predicted,
    policy=LabelPolicy(),
    rules=ExclusionRules(),
    bootstrap_samples=1000,
    seed=0,
    confidence=0.95,
    averages=None,
) -> EvaluationResult:
    """Scores (n, 14) predicted labels against (n, 14) reference labels.

    `averages` names subsets of findings to average over ({name: findings, or None for all included}); excluded
    findings drop out of every subset. Default: one "Average" over all included findings."""
    if not isinstance(bootstrap_samples, int) or bootstrap_samples < 1:
        raise ConfigError(f"bootstrap_samples={bootstrap_samples!r} (config.bootstrap_samples): the confidence intervals "
                          "need at least 1 resample")
    truth, called, counted = pair_outcomes(reference, predicted, policy)
    if not len(truth):
        raise InputError("no reports to score")
    excluded = exclusions(truth, counted, rules)
    included = [j for j, f in enumerate(CHEXPERT_OBSERVATIONS) if f not in excluded]
    tp = (truth & called & counted)[:, included].astype(np.float64)
    fp = (~truth & called & counted)[:, included].astype(np.float64)
    fn = (truth & ~called & counted)[:, included].astype(np.float64)

    weights = bootstrap_weights(len(tp), bootstrap_samples, seed)
    observed = [x.sum(0) for x in (tp, fp, fn)]  # (k,) each
    resampled = [weights @ x for x in (tp, fp, fn)]  # (samples, k) each
    point_prf = precision_recall_f1(*observed)  # (k,) each
    boot_prf = precision_recall_f1(*resampled)  # (samples, k) each
    tail = 50 * (1 - confidence)

    def summarize(point, boot, columns):
        cis = [tuple(float(v) for v in np.percentile(b, [tail, 100 - tail])) for b in boot]
        totals = [int(c[columns].sum()) for c in observed]
        return Score(*(float(v) for v in point), *cis, *totals)

    findings = []
    for col, j in enumerate(included):
        score = summarize([m[col] for m in point_prf], [m[:, col] for m in boot_prf], [col])
        positives = int((truth & counted)[:, j].sum())
        findings.append(FindingResult(CHEXPERT_OBSERVATIONS[j], int(counted[:, j].sum()), positives, score))

    names = [CHEXPERT_OBSERVATIONS[j] for j in included]
    average_results = {}
    for name, subset in (averages or {"Average": None}).items():
        columns = [c for c, f in enumerate(names) if subset is None or f in subset]
        if not columns:
            continue
        pooled_point = precision_recall_f1(*(c[columns].sum() for c in observed))
        pooled_boot = precision_recall_f1(*(c[:, columns].sum(-1) for c in resampled))
        average_results[name] = {
            "micro": summarize(pooled_point, pooled_boot, columns),
            "macro": summarize([m[columns].mean() for m in point_prf], [m[:, columns].mean(-1) for m in boot_prf],
                               columns),
        }

    return EvaluationResult(
        findings, excluded, average_results, len(tp), policy, rules, bootstrap_samples, seed, confidence
    )


def standard_aggregates(reference, predicted, bootstrap_samples=1000, seed=0, confidence=0.95) -> EvaluationResult:
    """F1-14 and F1-5, micro and macro with bootstrap intervals, by the field's CheXbert-style convention."""
    return score_labels(reference, predicted, STANDARD_POLICY, STANDARD_RULES, bootstrap_samples, seed, confidence,
                        STANDARD_AVERAGES)


def _ratio(numerator, denominator):
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape),
                     where=denominator > 0)
