"""Report refinement: the rule-based refiner on MIMIC- and Indiana-style reports, the LLM refiner against a local
stand-in of an OpenAI-compatible chat completions server, and the `cxrllava refine` command."""

import csv
import http.server
import json
import threading

import pytest

from cxrllava_jax import cli
from cxrllava_jax.domain.label_files import read_reports_csv
from cxrllava_jax.domain.labeler import label_report
from input_pipeline.refine import (PAPER_PROMPT, RefinedReport, RefineError, chat_completions_url, parse_llm_answer,
                                   refine_report, refine_with_llm)

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  //  eval for infection

 COMPARISON:  Chest radiograph from ___.

 FINDINGS:

 PA and lateral views of the chest were provided.  Compared to the prior study, there is a new
 1.5 cm nodule in the right upper lobe.  Stable moderate cardiomegaly.  A right-sided PICC line
 terminates in the mid SVC.  There is no focal consolidation or pneumothorax.  The lungs are otherwise clear.
 Small left pleural effusion, seen only on the lateral view.  The right effusion has resolved.

 IMPRESSION:

 1. New right upper lobe nodule measuring 15 x 12 mm.
 2. Findings were discussed with Dr. ___ at 10:30 a.m. on ___.
"""


def test_rule_based_refiner_strips_what_one_radiograph_cannot_show():
    refined = refine_report(MIMIC_REPORT)
    assert refined.standard_report == ("There is a nodule in the right upper lobe. Moderate cardiomegaly. There is "
                                       "no focal consolidation or pneumothorax. The lungs are otherwise clear. "
                                       "Small left pleural effusion.")
    assert refined.conclusion == "Right upper lobe nodule." and refined.recommendation == ""
    text = refined.text.lower()
    for gone in ("prior", "compared", "new", "stable", "picc", "svc", "lateral", "cm", "mm", "___", "ascites",
                 "discussed", "resolved", "10:30"):
        assert gone not in text, gone
    # What the labeler reads from the refined report is what the image can show.
    labels = label_report(refined.text)
    assert labels["Lung Lesion"] == labels["Cardiomegaly"] == labels["Pleural Effusion"] == 1
    assert labels["Pneumothorax"] == labels["Consolidation"] == 0
    assert labels["Support Devices"] != labels["Support Devices"]  # NaN: the device is gone


def test_rule_based_refiner_on_plain_and_indiana_text():
    assert refine_report("FINDINGS: The cardiac silhouette and mediastinum size are within normal limits. There "
                         "are no XXXX of a pleural effusion.\n\nIMPRESSION: Normal chest x-XXXX.") == RefinedReport(
        "The cardiac silhouette and mediastinum size are within normal limits.", "Normal chest x-ray.")
    refined = refine_report("The 67-year-old male has a history of CHF. Heart size is normal. Endotracheal tube "
                            "terminates 4 cm above the carina. No pneumothorax")
    assert refined == RefinedReport("Heart size is normal. No pneumothorax.")
    assert refine_report("Comparison is made to the prior study.").text == ""


@pytest.fixture
def chat_server():
    """A local OpenAI-compatible /v1/chat/completions stand-in; records the requests it gets."""
    requests, answers = [], []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            status, content = answers.pop(0) if answers else (200, default_answer(body))
            reply = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests, answers
    server.shutdown()
    thread.join()


def default_answer(body) -> str:
    report = body["messages"][-1]["content"]
    return "```json\n" + json.dumps({"standard report": f"Refined: {report[:20]}", "conclusion": "No acute process.",
                                     "recommendation": "None."}) + "\n```"


def test_llm_refiner_sends_the_paper_prompt(chat_server, monkeypatch):
    url, requests, _ = chat_server
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    refined = refine_with_llm(MIMIC_REPORT, url + "/v1", "gpt-4")
    assert refined == RefinedReport(f"Refined: {MIMIC_REPORT[:20]}", "No acute process.", "None.")
    (request,) = requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer test-key"
    assert request["body"]["model"] == "gpt-4" and request["body"]["temperature"] == 0
    assert request["body"]["messages"] == [{"role": "system", "content": PAPER_PROMPT},
                                           {"role": "user", "content": MIMIC_REPORT}]
    assert "Remove any under-bar & blank." in PAPER_PROMPT and '"standard_report"' in PAPER_PROMPT


def test_llm_refiner_errors_are_clear(chat_server):
    url, _, answers = chat_server
    answers.append((200, "I cannot help with that."))
    with pytest.raises(RefineError, match="not a JSON object: 'I cannot help"):
        refine_with_llm("No effusion.", url, "m")
    answers.append((500, "boom"))
    with pytest.raises(RefineError, match="HTTP 500"):
        refine_with_llm("No effusion.", url, "m")
    with pytest.raises(RefineError, match="no standard_report"):
        parse_llm_answer('{"conclusion": "x"}')
    assert parse_llm_answer('Sure: {"standard_report": ["A.", "B."]}') == RefinedReport("A. B.")
    assert chat_completions_url("http://h/v1/chat/completions/") == "http://h/v1/chat/completions"
    assert chat_completions_url("http://h") == "http://h/v1/chat/completions"


def _write_reports(path, reports):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([r] for r in reports)


def test_refine_command(tmp_path, chat_server, capsys):
    reports = [MIMIC_REPORT, "Heart size is normal, lungs are clear.", "Comparison is made to the prior study."]
    _write_reports(tmp_path / "in.csv", reports)
    assert cli.main(["refine", "--reports", str(tmp_path / "in.csv"), "--out", str(tmp_path / "out.csv")]) == 0
    with open(tmp_path / "out.csv", newline="") as f:
        rows = [row[0] for row in csv.reader(f)]
    assert rows == [refine_report(r).text for r in reports] and rows[2] == ""
    assert "refined 3 reports" in capsys.readouterr().err
    # The output is the labeler's input format.
    assert read_reports_csv(tmp_path / "out.csv") == rows[:2]

    url, requests, _ = chat_server
    assert cli.main(["refine", "--reports", str(tmp_path / "in.csv"), "--out", str(tmp_path / "llm.csv"),
                     "--llm-url", url, "--model", "local-model"]) == 0
    assert [r["body"]["messages"][1]["content"] for r in requests] == reports
    with open(tmp_path / "llm.csv", newline="") as f:
        assert [row[0] for row in csv.reader(f)][1] == ("FINDINGS: Refined: Heart size is normal\n\n"
                                                       "IMPRESSION: No acute process.")
    with pytest.raises(SystemExit):
        cli.main(["refine", "--reports", str(tmp_path / "in.csv"), "--out", "x.csv", "--llm-url", url])
