"""CheXpert-style report labeler: free-text report -> positive / negative / uncertain / not mentioned per observation.

The stages follow the CheXpert labeler: split the report into sentences and clauses, extract mentions with the
phrase lists in `phrases`, then classify each mention by the cues in its clause, in this order: pre-negation
uncertainty ("cannot exclude pneumonia" is uncertain, not negative), negation, post-negation uncertainty.
Mentions of one observation are aggregated positive > uncertain > negative, and No Finding is derived: positive
when no observation other than Support Devices, and none of the other findings the CheXpert labeler lists (emphysema,
granuloma, scoliosis, ...), is positive or uncertain, otherwise not mentioned. As there, a positive or uncertain
"heart failure" makes Cardiomegaly uncertain, and statements that carry their own state are read as such ("heart
size is normal": Cardiomegaly negative; "stable cardiomediastinal silhouette": Enlarged Cardiomediastinum uncertain).
Rules instead of a dependency parse: a cue reaches forward or back within its clause, stopped by a verb or by a
comma that starts a new finding (see `phrases.FORWARD_SCOPE_STOP`), except through a list that ends in "or"
("no consolidation, large effusion, or pneumothorax"). A cue after a mention reaches back only to what its verb is
said of: not across "represent" or "consistent with" ("consolidation may represent atelectasis versus pneumonia":
the consolidation is seen) nor across a device's tip ("enteric tube tip not seen": the tube is there).

Where the CheXpert labeler and human readers differ, the development set (NegBio's hand labels of Open-i reports,
`evaluation.labeler_devset`) decided: "atelectasis or scarring" stays positive (the CheXpert labeler's "X or Y"
rule would make both uncertain: Atelectasis recall on the development set falls from 0.90 to 0.74), "pneumonitis"
is a pneumonia (its phrase "pneumonia" misses it; the hand labels count it), an old or granulomatous infection is
none, and a few chronic findings it does not list also rule out No Finding. "Suggestive of X" stays uncertain: the
CheXpert labeler reads only "suggestion of" so (no pattern names "suggestive" or "suggest"), but the hand labels
mostly do not count "suggestive of atelectasis / pneumonia"; reading it as positive moved Edema from 0.84 to 0.89
and Atelectasis from 0.94 to 0.93, Pneumonia from 0.83 to 0.82, micro-F1 from 0.908 to 0.906. Its substring matches are not copied
either: "tube" inside "tuberculosis", "plate" inside "endplate" and the "line" of a pleural line are no devices,
and "the heart and lungs have ..." with no state says nothing about the heart's size.
"""

import functools
import re
from typing import NamedTuple

import numpy as np

from cxrllava_jax.domain import phrases
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS, NEGATIVE, POSITIVE, UNCERTAIN

NOT_MENTIONED = float("nan")
LABELED_OBSERVATIONS = tuple(o for o in CHEXPERT_OBSERVATIONS if o != "No Finding")
# Mentions of findings outside the 14 observations count only towards No Finding.
OTHER_FINDING = "other finding"
_NOT_A_FINDING = ("Support Devices",)
_PRECEDENCE = {POSITIVE: 2, UNCERTAIN: 1, NEGATIVE: 0}

# Sentence ends: punctuation then space (so "1.5 cm" stays whole), or a blank line; single newlines are line wraps.
SENTENCE_END = re.compile(r"(?<=[.?!])\s+|\n\s*\n")
# As the CheXpert labeler does, a period or comma glued to the next word gets its space: "atelectasis.catheter".
_GLUED_PUNCTUATION = re.compile(r"(?<=[a-z][.,])(?=[a-z])")
_SEGMENT = re.compile(r",|\band\b")
_LIST_LINK = re.compile(r"\b(?:and|or)\b")
# "No consolidation, large effusion, or pneumothorax": a list that ends in "or" (or "/") is negated as a whole.
_OR_LIST = re.compile(r",[^,]*(?:\b(?:or|nor)\b|/)")
_HEART_FAILURE = re.compile(r"\b(?:chf|heart failure)\b")
_TRAILING_VERB = re.compile(r"\b(?:is|are|was|were)\s*$")


def _compile(fragments):
    return re.compile("|".join(f"(?:{f})" for f in fragments))


class _Vocabulary(NamedTuple):
    """What one observation's mentions look like. `anything` (any of the three kinds) is searched first: one
    regex search rules out most (clause, observation) pairs, which keeps labeling fast."""

    anything: re.Pattern
    mentions: re.Pattern
    normal: re.Pattern | None
    uncertain: re.Pattern | None
    unmentions: re.Pattern | None


def _vocabulary(mentions, normal=(), uncertain=(), unmentions=()):
    return _Vocabulary(_compile(mentions + normal + uncertain), _compile(mentions),
                       *(_compile(p) if p else None for p in (normal, uncertain, unmentions)))


class ReportLabeler:
    """Compiles the phrase lists once; `label` is then a pure function of the report text."""

    def __init__(self):
        self._vocabularies = {
            o: _vocabulary(phrases.MENTIONS[o], phrases.NORMAL_STATEMENTS.get(o, ()),
                           phrases.UNCERTAIN_STATEMENTS.get(o, ()), phrases.UNMENTIONS.get(o, ()))
            for o in LABELED_OBSERVATIONS
        }
        self._vocabularies[OTHER_FINDING] = _vocabulary(phrases.OTHER_FINDINGS)
        # Reports repeat their sentences ("No pneumothorax."): on Open-i two clauses in three were seen before.
        self._clause_labels = functools.lru_cache(maxsize=1 << 16)(self._read_clause)
        self._clause_break = re.compile(phrases.CLAUSE_BREAKS)
        self._pre_negation_uncertainty = _compile(phrases.PRE_NEGATION_UNCERTAINTY)
        self._negation_before = _compile(phrases.NEGATION_BEFORE)
        self._negation_after = _compile(phrases.NEGATION_AFTER)
        self._uncertainty_before = _compile(phrases.UNCERTAINTY_BEFORE)
        self._uncertainty_after = _compile(phrases.UNCERTAINTY_AFTER)
        self._pseudo_negation = _compile(phrases.PSEUDO_NEGATION)
        self._scope_stop = re.compile(phrases.FORWARD_SCOPE_STOP)
        self._back_scope_stop = re.compile(phrases.BACKWARD_SCOPE_STOP)
        self._device_part = re.compile(phrases.DEVICE_PART)
        self._device_part_before = re.compile(phrases.DEVICE_PART_BEFORE)
        self._new_finding = re.compile(phrases.NEW_FINDING_START)

    def label(self, report: str) -> dict:
        """{observation: POSITIVE | NEGATIVE | UNCERTAIN | NOT_MENTIONED (NaN)} for all 14 observations."""
        labels = {}
        for clause in self._clauses(report):
            for observation, value in self._clause_labels(clause):
                previous = labels.get(observation)
                if previous is None or _PRECEDENCE[value] > _PRECEDENCE[previous]:
                    labels[observation] = value
        findings = [v for o, v in labels.items() if o not in _NOT_A_FINDING]
        labels["No Finding"] = POSITIVE if all(v == NEGATIVE for v in findings) else NOT_MENTIONED
        return {o: labels.get(o, NOT_MENTIONED) for o in CHEXPERT_OBSERVATIONS}

    def label_many(self, reports) -> np.ndarray:
        """(n_reports, 14) float array in CHEXPERT_OBSERVATIONS order, NaN for not mentioned."""
        return np.array([list(self.label(r).values()) for r in reports], dtype=np.float64).reshape(-1, 14)

    def _clauses(self, report):
        for sentence in SENTENCE_END.split(_GLUED_PUNCTUATION.sub(" ", report.lower())):
            for clause in self._clause_break.split(" ".join(sentence.split())):
                if clause.strip():
                    yield clause

    def _read_clause(self, clause) -> tuple:
        return tuple(self._mentions_in(clause))

    def _mentions_in(self, clause):
        """(observation, value) for each mention in the clause."""
        cues = None  # found lazily: most clauses mention nothing
        for observation, vocabulary in self._vocabularies.items():
            if not vocabulary.anything.search(clause):
                continue
            # An unmention ("over the heart") takes its words out of statements too: "a generator over the heart
            # is unchanged" says nothing of the heart's size.
            unmentions = _spans(vocabulary.unmentions, clause)
            normal_spans, uncertain_spans = (
                [s for s in _spans(pattern, clause) if not any(_overlaps(s, u) for u in unmentions)]
                for pattern in (vocabulary.normal, vocabulary.uncertain))
            excluded = normal_spans + uncertain_spans + unmentions
            cues = cues or self._cues(clause)
            for _ in normal_spans:
                yield observation, NEGATIVE
            for span in uncertain_spans:  # uncertain by itself, unless negated: "no vascular congestion"
                yield observation, min(self._classify(clause, span, cues), UNCERTAIN, key=_PRECEDENCE.get)
            for span in _spans(vocabulary.mentions, clause):
                if any(_overlaps(span, other) for other in excluded):
                    continue
                value = self._classify(clause, span, cues)
                yield observation, value
                if value != NEGATIVE and _HEART_FAILURE.search(clause, *span):
                    yield "Cardiomegaly", UNCERTAIN

    def _cues(self, clause):
        pseudo = [m.span() for m in self._pseudo_negation.finditer(clause)]

        def spans(pattern):
            return [m.span() for m in pattern.finditer(clause) if not any(_overlaps(m.span(), p) for p in pseudo)]

        return {
            "pre_negation_uncertainty": spans(self._pre_negation_uncertainty),
            "negation_before": spans(self._negation_before),
            "negation_after": spans(self._negation_after),
            "uncertainty_before": spans(self._uncertainty_before),
            "uncertainty_after": spans(self._uncertainty_after),
        }

    def _classify(self, clause, span, cues):
        pre = cues["pre_negation_uncertainty"]
        if self._reached_forward(clause, pre, span) or self._reached_back(clause, pre, span):
            return UNCERTAIN
        if self._reached_forward(clause, cues["negation_before"], span) or self._reached_back(
            clause, cues["negation_after"], span
        ):
            return NEGATIVE
        if self._reached_forward(clause, cues["uncertainty_before"], span) or self._reached_back(
            clause, cues["uncertainty_after"], span
        ):
            return UNCERTAIN
        return POSITIVE

    def _reached_forward(self, clause, cue_spans, mention):
        start, end = mention
        for cue_start, cue_end in cue_spans:
            if cue_start >= end:
                continue
            if cue_end > start:  # the cue sits inside the mention: "heart is not enlarged"
                return True
            between = clause[cue_end:start]
            if self._scope_stop.search(between):
                continue
            segments = _SEGMENT.split(between)[1:]
            if not any(self._new_finding.match(s.lstrip()) for s in segments) or _OR_LIST.search(clause, cue_end):
                return True
        return False

    def _reached_back(self, clause, cue_spans, mention):
        start, end = mention
        if self._device_part_before.search(clause, 0, start):
            return False
        for cue_start, _ in cue_spans:
            if cue_start < end:
                continue
            # The verb that links the mention to its cue ("pneumonia is not excluded") does not end the scope.
            between = _TRAILING_VERB.sub("", clause[end:cue_start])
            if self._back_scope_stop.search(between) or self._device_part.search(between):
                continue
            # Back across a comma only through a list: "effusion, consolidation or pneumothorax is not seen".
            if "," in between and not _LIST_LINK.search(between.rsplit(",", 1)[1]):
                continue
            return True
        return False


def _spans(pattern, text):
    return [m.span() for m in pattern.finditer(text)] if pattern else []


def _overlaps(a, b):
    return a[0] < b[1] and b[0] < a[1]


@functools.cache
def default_labeler() -> ReportLabeler:
    return ReportLabeler()


def label_report(report: str) -> dict:
    """Labels of one report: {observation: 1.0 / 0.0 / -1.0 / NaN}."""
    return default_labeler().label(report)


def label_reports(reports) -> np.ndarray:
    """Labels of many reports as an (n, 14) array in CHEXPERT_OBSERVATIONS order."""
    return default_labeler().label_many(reports)
