"""Which average the paper reports, checked against its own numbers.

The tables give per-finding F1 (rounded to 2 decimals) and an "average"; the supplement gives the reference
positives per finding. The macro average (mean of per-finding F1) is then known to within rounding. The micro
average (F1 of pooled counts) equals sum_i F1_i w_i / sum_i w_i with w_i = positives_i + predicted positives_i,
and since 0 <= TP_i <= positives_i and TP_i <= predicted positives_i, each w_i lies in
[2 P_i / (2 - F1_i), 2 P_i / F1_i]; the extremes of the weighted mean over that box bound the micro average.
A reported average outside a range rules that convention out.
"""

import itertools

import numpy as np

from cxrllava_jax.evaluation import paper_tables

_HALF_UNIT = 0.005  # the paper rounds F1 to two decimals


def macro_f1_range(f1s, half_unit=_HALF_UNIT):
    f1s = np.asarray(f1s, np.float64)
    return float(np.clip(f1s - half_unit, 0, 1).mean()), float(np.clip(f1s + half_unit, 0, 1).mean())


def micro_f1_range(f1s, positives, half_unit=_HALF_UNIT):
    """(low, high) of the micro F1 that per-finding F1s (each +- half_unit) and reference positives allow."""
    f1s, positives = np.asarray(f1s, np.float64), np.asarray(positives, np.float64)
    f_low, f_high = np.clip(f1s - half_unit, 0, 1), np.clip(f1s + half_unit, 0, 1)
    w_min = 2 * positives / (2 - f_low)
    # A finding with F1 0 may have any number of false positives: cap its weight far above everything else.
    w_max = np.where(f_low > 0, 2 * positives / np.maximum(f_low, 1e-12), 1e6 * positives.sum())
    low, high = 1.0, 0.0
    # A ratio of linear functions over a box is extreme at a vertex; there are at most 2^7 here.
    for corner in itertools.product((False, True), repeat=len(f1s)):
        w = np.where(corner, w_max, w_min)
        low = min(low, float((f_low * w).sum() / w.sum()))
        high = max(high, float((f_high * w).sum() / w.sum()))
    return low, high


def average_convention(table_key, model=paper_tables.CXR_LLAVA) -> dict:
    """For each average row of a paper table: the reported value, the macro and micro ranges, and which fit."""
    table = paper_tables.TABLES[table_key]
    column = table.models.index(model)
    distribution = paper_tables.LABEL_DISTRIBUTIONS[table_key]
    checks = {}
    for label, (findings, values) in table.averages.items():
        if values[column] is None:
            continue
        reported = values[column][0]
        f1s = [table.rows[f][column][0] for f in findings]
        macro = macro_f1_range(f1s)
        micro = micro_f1_range(f1s, [distribution[f][1] for f in findings])
        checks[label] = {
            "reported": reported,
            "macro_range": macro,
            "micro_range": micro,
            "macro_fits": macro[0] <= reported <= macro[1],
            "micro_fits": micro[0] - _HALF_UNIT <= reported <= micro[1] + _HALF_UNIT,
        }
    return checks
