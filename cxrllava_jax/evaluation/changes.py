"""Change statements: what a report says about each finding since the prior study, and how often a generated report
says the same as its reference.

A sentence that names a finding and a change cue is that finding's statement: new, resolved, better, worse or
unchanged (`change_statements`; the first statement about a finding counts, as the findings section comes before the
impression that repeats it). "No new X" states no change. `change_scores` takes every statement of the reference
reports and counts the generated report right when it states the same change for that finding; "changed" is the
share of those whose reference change is not "unchanged" (what a model that cannot see the prior cannot know).
"""

import re

# Finding -> the words that name it in a report (lower case; the first match in a sentence names it).
FINDING_TERMS = {
    "pleural effusion": ("pleural effusion", "effusion"),
    "cardiomegaly": ("cardiomegaly", "heart size", "cardiac silhouette", "heart is"),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation",),
    "edema": ("edema",),
    "atelectasis": ("atelectasis",),
    "nodule or mass": ("nodule", "mass"),
    "opacity": ("opacity", "opacities"),
    "support device": ("tube", "catheter", "line", "pacemaker"),
}
# Change -> its cues, tried in this order ("resolved" before "new": "the new effusion has resolved" resolved).
CUES = (
    ("resolved", ("resolved", "resolution", "no longer", "has cleared", "have cleared")),
    ("worse", ("increased", "increasing", "worse", "worsened", "worsening", "enlarged since", "larger", "progressed",
               "progression")),
    ("better", ("decreased", "decreasing", "improved", "improving", "smaller", "less prominent", "regressed")),
    ("unchanged", ("unchanged", "stable", "no change", "no interval change", "similar", "persistent", "again seen")),
    ("new", ("new", "newly", "interval development", "has developed", "have developed")),
)
CHANGES = tuple(change for change, _ in CUES)
_NO_NEW = re.compile(r"\bno (?:other )?new\b")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def change_statements(report: str) -> dict[str, str]:
    """{finding: change} for every finding the report states a change of."""
    found: dict[str, str] = {}
    for sentence in _SENTENCE.split(report.lower()):
        change = _change(sentence)
        if change is None:
            continue
        for finding, terms in FINDING_TERMS.items():
            if finding not in found and any(re.search(rf"\b{re.escape(term)}", sentence) for term in terms):
                found[finding] = change
    return found


def _change(sentence: str) -> str | None:
    if _NO_NEW.search(sentence):
        return None
    for change, cues in CUES:
        if any(re.search(rf"\b{re.escape(cue)}\b", sentence) for cue in cues):
            return change
    return None


def change_scores(references: list[str], generated: list[str]) -> dict:
    """Accuracy of the generated reports' change statements against the references': overall, on the findings that
    changed, and per reference change; counts beside each (0 statements: nothing to score, accuracies None)."""
    pairs = []  # (reference change, generated change or None)
    for reference, text in zip(references, generated, strict=True):
        said = change_statements(text)
        pairs += [(change, said.get(finding)) for finding, change in change_statements(reference).items()]
    changed = [(r, g) for r, g in pairs if r != "unchanged"]
    return {"statements": len(pairs), "accuracy": _accuracy(pairs),
            "changed": len(changed), "changed_accuracy": _accuracy(changed),
            "per_change": {c: {"count": sum(r == c for r, _ in pairs), "accuracy": _accuracy(
                [(r, g) for r, g in pairs if r == c])} for c in CHANGES}}


def _accuracy(pairs) -> float | None:
    return sum(r == g for r, g in pairs) / len(pairs) if pairs else None
