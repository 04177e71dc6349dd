"""Report refinement: strip what one radiograph cannot show (comparisons with prior studies, patient history and
demographics, devices, lateral views, measurements, anonymisation marks), as the paper did with GPT-4.

Two refiners give the same `RefinedReport` (the keys of the paper's prompt):
- `refine_report`, offline and rule-based (the default): keeps FINDINGS as the standard report and IMPRESSION as
  the conclusion, trims comparison clauses, measurements and temporal modifiers, and drops the sentences about
  devices, history, the lateral view or change since a prior study that it cannot rewrite, and those with an
  anonymisation mark (___, XXXX) in them. It is conservative: a finding stated only relative to a prior study
  is lost, never distorted. It writes no recommendation.
- `refine_with_llm`: sends the paper's prompt (`PAPER_PROMPT`, from its supplement) and the report to an
  OpenAI-compatible chat completions endpoint and parses the JSON answer. The API key, if the server needs one,
  is read from OPENAI_API_KEY.

`cxrllava refine --reports IN.csv --out OUT.csv [--llm-url URL --model NAME]` reads and writes the CheXpert
labeler's headerless one-report-per-row CSV, row for row, so the output can go straight to `cxrllava label`.
"""

import csv
import dataclasses
import json
import os
import re
import sys
import urllib.error
import urllib.request

from cxrllava_jax import arguments, files
from cxrllava_jax.domain import phrases
from cxrllava_jax.domain.label_files import read_reports_csv
from cxrllava_jax.errors import InputError
from input_pipeline.records import sectioned_report

PAPER_PROMPT = """You are skillful radiologist and doing summarization of chest x-ray report.
Summarize these information from the report.
Answer to each questions as json format which have "standard report", "conclusion" and "recommendation" as keys.

1. "standard_report" : Write a standardized radiologic report as one paragraph. Standardized report must include information about abnormality of lungs, mediastinum, heart and thorax.
2. "conclusion" : What is the conclusion or impression of the radiologic report? Include only critical information.
3. "recommendation" : Should additional radiologic study needed? What type of study should be performed?

Do not include any temporal or time information in standard_report and conclusion. DO NOT USE WORD SUCH AS "new", "previous", "comparison", "stable", "improved", "improving", "decreased", "increased", "changed", "unchanged", "resolved", or "cleared".
Do not include information about 'comparison with prior study'.
Do not include information about lateral radiograph.
Replace any numeric information, such as millimeter or centimeter
Remove any information about patient age, gender, and medical history.
Remove any under-bar & blank.
Remove any information or location about catheter, chest tube, endotracheal tube, PICC, chemoport, central line, nasogastric tube or other medical devices."""  # noqa: E501


class RefineError(InputError):
    """An LLM endpoint failed or answered something that is not the prompt's JSON."""


@dataclasses.dataclass
class RefinedReport:
    standard_report: str
    conclusion: str = ""
    recommendation: str = ""

    @property
    def text(self) -> str:
        """The training target: 'FINDINGS: <standard report>\\n\\nIMPRESSION: <conclusion>'."""
        return sectioned_report([("FINDINGS", self.standard_report), ("IMPRESSION", self.conclusion)])


# ---------------------------------------------------------------- rule-based

_SECTION_HEAD = re.compile(r"(?:^|\n)\s*([A-Z][A-Z /&]{2,40}):", re.MULTILINE)
_STANDARD_SECTIONS = ("FINDINGS", "FINDING", "REPORT")
_CONCLUSION_SECTIONS = ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "SUMMARY")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z0-9_])|\n\s*\n|\n\s*(?=\d+\.\s)")
_LIST_NUMBER = re.compile(r"^\s*\d+\.\s+")
# Indiana's de-identification masked the "ray" of "x-ray".
_MASKED_XRAY = re.compile(r"\bx-XXXX\b", re.IGNORECASE)


def _any(*patterns: str) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


# Clauses that compare with an earlier study; removed from a sentence, which then stands on its own.
_COMPARISON_CLAUSE = _any(
    r",?\s*\b(?:as |when |and )?(?:compared|in comparison) (?:to|with) [^,.;]*",
    r",?\s*\b(?:relative|similar|unchanged|stable) (?:to|from) (?:the |a )?(?:prior|previous|recent|earlier|last) "
    r"[^,.;]*",
    r",?\s*\bsince (?:the |a )?(?:prior|previous|recent|earlier|last)[^,.;]*",
    r",?\s*\b(?:from|than on|than in|on|in) (?:the |a )?(?:prior|previous|recent|earlier|last)\s+"
    r"(?:\w+\s+)?(?:study|studies|exam|examination|radiograph|radiographs|film|films|image|images|chest x-ray|cxr)\b",
    r",?\s*\b(?:(?:as|when|also|again|previously)\s+)*(?:seen|noted) (?:on|in) [^,.;]*\b(?:prior|previous|earlier)\b"
    r"[^,.;]*",
)
_LATERAL_CLAUSE = _any(r",?\s*\b(?:(?:as|best|only|seen|visible|demonstrated|noted)\s+)*(?:on|in) (?:the |a )?"
                       r"lateral (?:view|radiograph|image|projection|film)s?\b")
# Words of change that an adjective can lose ("stable cardiomegaly" -> "cardiomegaly").
_TEMPORAL_MODIFIER = _any(r"\b(?:new|newly|stable|unchanged|persistent|persisting|redemonstrated|re-demonstrated|"
                          r"again|grossly unchanged|interval|interval(?:ly)? (?:increased|decreased))\s+(?=[a-z])")
_MEASUREMENT = _any(r",?\s*\b(?:(?:which |that )?(?:measuring|measures|measured|of|up to|at least|approximately|"
                    r"about|roughly|nearly)\s+)*\d+(?:\.\d+)?(?:\s*(?:-|to)\s*\d+(?:\.\d+)?)?"
                    r"(?:\s*(?:x|by)\s*\d+(?:\.\d+)?)*\s*(?:mm|cm|millimeters?|centimeters?)\b(?:\s+in size)?")
# Sentences that the trims above cannot save.
_DROP = {
    "comparison": _any(r"\b(?:compar\w*|prior|previous\w*|earlier|interval|since|again|new|newly|stable|stably|"
                       r"unchanged|improv\w*|worsen\w*|resolv\w*|cleared|clearing|progress\w*|persist\w*|"
                       r"redemonstrat\w+|re-demonstrat\w+)\b",
                       r"\b(?:has|have|had|is|are|was|were)\s+(?:\w+ly\s+)?(?:increased|decreased|changed)\b",
                       r"\b(?:increased|decreased|changed)\s+(?:in|since|from)\b"),
    "history": _any(r"\byears?[- ]old\b", r"\by/?o\b", r"\b(?:male|female|man|woman|gentleman|lady|boy|girl)\b",
                    r"\bhistory\b", r"\bs/p\b", r"\bstatus post\b", r"\bpost[- ]?operative\b", r"\bsurg\w+\b",
                    r"\bclinical\w*\b", r"\bindication\b", r"\bpresent\w* with\b"),
    "communication": _any(r"\b(?:notif\w+|discussed|communicated|telephone|paged|called|informed)\b",
                          r"\b(?:dr|doctor)\b\.?"),
    "device": _any(*phrases.MENTIONS["Support Devices"], r"\bchemoport\b", r"\bport\b", r"\bwires?\b",
                   r"\btips?\b", r"\bcavoatrial\b"),
    "lateral view": _any(r"\blateral (?:view|radiograph|image|projection|film)s?\b"),
    "measurement": _any(r"\d"),
    # An anonymisation mark left after the trims hides a word the sentence needs (Indiana: "no XXXX of effusion").
    "anonymised": _any(r"_{2,}", r"\bX{2,}\b"),
}


def refine_report(report: str) -> RefinedReport:
    """The rule-based refinement of one report (any format: sectioned MIMIC/Indiana text or plain sentences)."""
    standard, conclusion = _split_sections(report)
    return RefinedReport(_refine_text(standard), _refine_text(conclusion))


def _split_sections(report: str) -> tuple[str, str]:
    heads = list(_SECTION_HEAD.finditer(report))
    if not heads:
        return report, ""
    sections: dict[str, list[str]] = {}
    for head, following in zip(heads, heads[1:] + [None]):
        body = report[head.end():following.start() if following else len(report)]
        sections.setdefault(head.group(1).strip().upper(), []).append(body)
    standard = " ".join(b for name in _STANDARD_SECTIONS for b in sections.get(name, []))
    conclusion = " ".join(b for name in _CONCLUSION_SECTIONS for b in sections.get(name, []))
    return (standard, conclusion) if standard or conclusion else (report, "")


def _refine_text(text: str) -> str:
    kept = []
    for sentence in _SENTENCE_END.split(text):
        sentence = _refine_sentence(sentence)
        if sentence:
            kept.append(sentence)
    return " ".join(kept)


def _refine_sentence(sentence: str) -> str:
    sentence = _LIST_NUMBER.sub("", " ".join(sentence.split()))
    sentence = _MASKED_XRAY.sub("x-ray", sentence)
    for pattern in (_COMPARISON_CLAUSE, _LATERAL_CLAUSE, _MEASUREMENT, _TEMPORAL_MODIFIER):
        sentence = pattern.sub("", sentence)
    sentence = re.sub(r"\s+([,.;:?!])", r"\1", " ".join(sentence.split()))
    sentence = re.sub(r"([,;:])(?=[.?!]|$)", "", sentence).strip(" ,;:")
    if len(re.findall(r"[A-Za-z]{2,}", sentence)) < 2 or any(p.search(sentence) for p in _DROP.values()):
        return ""
    sentence = sentence[0].upper() + sentence[1:]
    return sentence if sentence[-1] in ".?!" else sentence + "."


# ---------------------------------------------------------------- LLM

def refine_with_llm(report: str, url: str, model: str, timeout: float = 120.0) -> RefinedReport:
    """The paper's GPT-4 refinement through an OpenAI-compatible endpoint (URL of the server, its /v1, or its
    /chat/completions)."""
    body = {"model": model, "temperature": 0,
            "messages": [{"role": "system", "content": PAPER_PROMPT}, {"role": "user", "content": report}]}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    endpoint = chat_completions_url(url)
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.load(response)
        content = payload["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as error:
        raise RefineError(f"{endpoint}: HTTP {error.code} {error.reason}: {error.read()[:300]!r}") from None
    except (urllib.error.URLError, TimeoutError) as error:
        raise RefineError(f"{endpoint}: cannot reach the endpoint ({error})") from None
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise RefineError(f"{endpoint}: not a chat completions response ({error!r})") from None
    return parse_llm_answer(content)


def chat_completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def parse_llm_answer(content: str) -> RefinedReport:
    """The prompt's JSON ('standard_report' or 'standard report', 'conclusion', 'recommendation'), also when the
    model wraps it in a code fence or prose."""
    start, end = content.find("{"), content.rfind("}")
    try:
        answer = json.loads(content[start:end + 1]) if start >= 0 else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise RefineError(f"the model's answer is not a JSON object: {content[:300]!r}")
    answer = {k.strip().lower().replace(" ", "_"): v for k, v in answer.items()}
    if "standard_report" not in answer:
        raise RefineError(f"the model's answer has no standard_report: {content[:300]!r}")
    return RefinedReport(*(_as_text(answer.get(k, "")) for k in ("standard_report", "conclusion", "recommendation")))


def _as_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value or "")


# ---------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = arguments.parser(
        "cxrllava refine", "Refine reports as the paper did with GPT-4: strip comparisons with prior studies, "
                           "history, devices, lateral views and numbers. Rule-based unless --llm-url is given.")
    parser.add_argument("--reports", required=True, type=arguments.input_file, help="headerless CSV, one report per row")
    parser.add_argument("--out", required=True, type=arguments.output_file,
                        help="headerless CSV of refined reports, row for row")
    parser.add_argument("--llm-url", help="OpenAI-compatible endpoint; without it the rule-based refiner runs")
    parser.add_argument("--model", help="model name for --llm-url")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if args.llm_url and not args.model:
        parser.error("--llm-url needs --model")
    files.refuse_existing(args.out, args.overwrite)
    reports = read_reports_csv(args.reports)
    refined = []
    for i, report in enumerate(reports):
        try:
            refined.append(refine_with_llm(report, args.llm_url, args.model) if args.llm_url else refine_report(report))
        except RefineError as error:
            raise RefineError(f"{args.reports} report {i + 1}: {error}") from None
    with files.replaced_atomically(args.out, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        for report in refined:
            writer.writerow([report.text])
    empty = sum(not r.text for r in refined)
    print(f"refined {len(reports)} reports -> {args.out}" + (f" ({empty} left empty)" if empty else ""),
          file=sys.stderr)
    return 0
