"""Tables shaped like the paper's Tables 2-4: our F1 (95% CI) per finding and averaged, the paper's columns beside
(only where the dataset scored is the paper's), then the field's standard aggregates (F1-14, F1-5)."""

import csv
import io

from cxrllava_jax.evaluation.metrics import EvaluationResult
from cxrllava_jax.evaluation.paper_tables import PaperTable


def comparison_rows(result: EvaluationResult, paper: PaperTable, standard: EvaluationResult | None = None) -> list:
    """One dict per table row: the paper's findings in its order, then findings only we scored, then averages, then
    the standard aggregates (no paper figure: the paper does not report them)."""
    ours = {f.finding: f for f in result.findings}
    names = list(paper.rows) + [f for f in ours if f not in paper.rows]
    rows = []
    for name in names:
        row = {"row": name, "kind": "finding", "ours": ours[name].score if name in ours else None}
        row["n"] = ours[name].n if name in ours else None
        row["positives"] = ours[name].positives if name in ours else None
        row["paper"] = paper.rows.get(name, (None,) * len(paper.models))
        rows.append(row)
    for label, (_, paper_values) in paper.averages.items():
        scores = result.averages.get(label, {})
        for kind in ("micro", "macro"):
            rows.append({
                "row": f"{label} ({kind})", "kind": f"average_{kind}", "ours": scores.get(kind), "n": None,
                "positives": None, "paper": paper_values if kind == "micro" else (None,) * len(paper.models),
            })
    for label, scores in (standard.averages if standard else {}).items():
        for kind in ("micro", "macro"):
            rows.append({"row": f"{label} ({kind})", "kind": f"standard_{kind}", "ours": scores[kind], "n": None,
                         "positives": None, "paper": (None,) * len(paper.models)})
    return rows


def markdown_table(result: EvaluationResult, paper: PaperTable, title: str, standard: EvaluationResult | None = None,
                   paper_columns: bool = True) -> str:
    """The table as Markdown; `paper_columns=False` leaves the paper's figures out (another dataset was scored)."""
    models = paper.models if paper_columns else ()
    head = ["Finding", "Ours F1 (95% CI)", "Precision", "Recall", "n (positive)"] + [f"{m} (paper)" for m in models]
    lines = [f"### {title}", "", _md_row(head), _md_row(["---"] * len(head))]
    for row in comparison_rows(result, paper, standard):
        score = row["ours"]
        cells = [row["row"]]
        if score is None:
            cells += ["excluded" if row["row"] in result.excluded else "-", "", "", ""]
        else:
            counts = f"{row['n']} ({row['positives']})" if row["n"] is not None else ""
            cells += [_f1_cell(score.f1, *score.f1_ci), f"{score.precision:.2f}", f"{score.recall:.2f}", counts]
        paper_cells = [_f1_cell(*v) if v else ("N/A" if row["kind"] == "finding" else "") for v in row["paper"]]
        lines.append(_md_row(cells + paper_cells[:len(models)]))
    lines += ["", f"Averages: micro = F1 of counts pooled over the averaged findings (the paper's \"average\"); "
              f"macro = mean of per-finding F1. {result.n_reports} reports, {result.bootstrap_samples} bootstrap "
              f"samples (seed {result.seed}); uncertain labels: {result.policy.uncertain}; reference not mentioned: "
              f"{result.policy.missing_reference}."]
    if standard:
        lines += ["", "F1-14 / F1-5: the field's CheXbert-style F1 (as f1chexbert and RadEval compute it) over all 14 "
                  "observations / Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion: every report "
                  "counts, positive or uncertain = 1, negative or not mentioned = 0, nothing excluded."]
    if result.excluded:
        lines += ["", "Excluded:"]
        lines += [f"- {finding}: {why}" for finding, why in result.excluded.items()]
        rules = result.rules
        lines += ["", f"The settings: min_class_count={rules.min_class_count}, "
                  f"min_class_fraction={rules.min_class_fraction}, always_excluded={tuple(rules.always_excluded)}. "
                  "Change them on eval.py's command line, e.g. --config.min_class_count=3 "
                  "--config.min_class_fraction=0 (a small run), --config.always_excluded=\"('No Finding',)\"."]
    if paper_columns:
        lines += ["", f"Paper's note: {paper.note}"]
    return "\n".join(lines + [""])


def csv_table(result: EvaluationResult, paper: PaperTable, standard: EvaluationResult | None = None,
              paper_columns: bool = True) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    models = paper.models if paper_columns else ()
    model_columns = [f"{m} {part}" for m in models for part in ("f1", "f1_low", "f1_high")]
    writer.writerow(["row", "kind", "f1", "f1_low", "f1_high", "precision", "recall", "tp", "fp", "fn", "n",
                     "positives", "excluded_because", *model_columns])
    for row in comparison_rows(result, paper, standard):
        score = row["ours"]
        ours = ([score.f1, *score.f1_ci, score.precision, score.recall, score.tp, score.fp, score.fn]
                if score else [""] * 8)
        ours = [f"{v:.4f}" if isinstance(v, float) else v for v in ours]
        paper_cells = [x for v in row["paper"][:len(models)] for x in (v if v else ("", "", ""))]
        why = result.excluded.get(row["row"], "") if row["kind"] == "finding" else ""
        writer.writerow([row["row"], row["kind"], *ours, _blank(row["n"]), _blank(row["positives"]), why,
                         *paper_cells])
    return out.getvalue()


def _f1_cell(f1, low, high):
    return f"{f1:.2f} ({low:.2f}, {high:.2f})"


def _md_row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _blank(value):
    return "" if value is None else value


def text_metrics_line(scores: dict) -> str:
    """The text metrics under the label table: BLEU-1..4 and ROUGE-L (x100, as papers print them)."""
    bleu = " / ".join(f"{100 * scores[f'bleu_{n}']:.1f}" for n in range(1, 5))
    rouge = 100 * scores["rouge_l"]
    return f"\nText: BLEU-1/2/3/4 {bleu}, ROUGE-L {rouge:.1f} (sacrebleu {scores['bleu_signature']})\n"
