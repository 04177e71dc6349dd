"""The web page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): upload the NIH
radiograph, see it in the viewer, window it from the keyboard, get the report streamed (a waiting state shown
until the first words come, the file it is about named with it), ask a follow-up with the keyboard, copy the
report; then a refused upload clears the image, the conversation and the buttons and says why, and a question may
come before any report; a study's frontal and lateral DICOM files chosen together are labelled with their views
and date and reported on as one study, and a lateral alone is refused; two PNG files, one set to lateral by the user,
with an indication, are reported on as that study. Writes a screenshot to $TEST_ARTIFACTS (default test-artifacts/).

Answers come from the tiny model with EOS never ending them (every answer is exactly its token budget long);
the texts shown must equal the library's greedy answers. The engine decodes a chunk only when the test lets it
(`Pace`), so the page is seen showing part of the report while the rest is not yet decoded, on any machine.
"""

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.studies import Study
from cxrllava_jax.inference.api import TextStream
from cxrllava_jax.inference.engine import Engine
from cxrllava_jax.serving.app import create_app
from cxrllava_jax.serving.limits import Limits
from tests.dicom_files import CURRENT_UID, NIH, write_two_studies
from tests.serving_fixtures import NIH_PNG, NON_CHEST_DICOM, LiveServer, endless_tiny_model

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"):  # .ci/run installs them: CI never skips
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402  (the skip above comes first)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "page-test-key"
ANSWER_TOKENS = 32
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


class Pace:
    """Which engine steps may run: any (the default), or, once `hold` is called, one per `step_once`."""

    def __init__(self):
        self._turn = threading.Condition()
        self._allowed: int | None = None  # steps that may still start; None: any number
        self._finished = 0

    def hold(self):
        with self._turn:
            self._allowed = 0

    def release(self):
        with self._turn:
            self._allowed = None
            self._turn.notify_all()

    def step_once(self, timeout: float = 120):
        """Lets one step run and returns when it has."""
        with self._turn:
            finished, self._allowed = self._finished, 1
            self._turn.notify_all()
            assert self._turn.wait_for(lambda: self._finished > finished, timeout), "the engine took no step"

    def step(self, run):
        with self._turn:
            self._turn.wait_for(lambda: self._allowed is None or self._allowed > 0)
            if self._allowed is not None:
                self._allowed -= 1
        try:
            run()
        finally:
            with self._turn:
                self._finished += 1
                self._turn.notify_all()


PACE = Pace()


class PacedEngine(Engine):
    """Steps when `PACE` lets it (the server's engine is a sibling of this class, so it is paced too)."""

    def step(self, *args, **kwargs):
        PACE.step(lambda: super(PacedEngine, self).step(*args, **kwargs))


@pytest.fixture(scope="module")
def model():
    return endless_tiny_model(PacedEngine)


@pytest.fixture(scope="module")
def server(model):
    live = LiveServer(create_app(model, "cxr-llava-tiny", api_key=KEY,
                                 limits=Limits(max_output_tokens=ANSWER_TOKENS)))
    yield live
    live.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _answers(browser) -> list[str]:
    # textContent, not Selenium's rendered .text, which folds whitespace (a random model writes \f and \t too)
    answers = browser.find_elements(By.CSS_SELECTOR, "#conversation .assistant p")
    return [e.get_property("textContent") for e in answers]


def _about(browser) -> list[str]:
    return [e.get_property("textContent") for e in browser.find_elements(By.CSS_SELECTOR, "#conversation .about")]


def _disabled(browser, *ids) -> list[bool]:
    return [bool(browser.find_element(By.ID, i).get_attribute("disabled")) for i in ids]


def _streamed(tokenizer, tokens: list[int]) -> str:
    """The text a stream of these tokens has sent (the server's TextStream)."""
    pieces: list[str] = []
    TextStream(tokenizer, pieces.append)(list(tokens))
    return "".join(pieces)


def _report_streams_in(browser, server, tokenizer, report: str, waiting: str):
    """Asks for the report with the engine held: the page says it is waiting for the first words `waiting` (...)
    until some come; one chunk at a time until the server has streamed some text, the page then shows exactly that
    part of `report` while the rest is not yet decoded; released, the rest comes."""
    PACE.hold()
    try:
        browser.find_element(By.ID, "report-button").click()
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "status").text.startswith(f"Waiting for the first words {waiting}"))
        shown = ""
        while not shown:
            PACE.step_once()
            running = [h for h in server.scheduler.engine.owners if h is not None]
            assert running, "the report ended before any of its text could be shown"
            shown = _streamed(tokenizer, running[0].tokens)
        assert report.startswith(shown) and shown != report
        WebDriverWait(browser, 60).until(lambda b: _answers(b) == [shown])
        assert not browser.find_element(By.ID, "status").text.startswith("Done")
    finally:
        PACE.release()
    _wait_until_answered(browser, 1)


def _wait_until_answered(browser, count: int):
    WebDriverWait(browser, 120).until(
        lambda b: len(_answers(b)) == count and b.find_element(By.ID, "status").text.startswith("Done"))


def test_report_and_follow_up_in_the_browser(model, server, browser, tmp_path):
    browser.get(server.url)
    assert "research use only" in browser.find_element(By.CSS_SELECTOR, ".notice").text.lower()
    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")

    # A file that is no image is refused, with the server's reason.
    notes = ARTIFACTS / "notes.txt"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    notes.write_text("not a radiograph")
    browser.find_element(By.ID, "file").send_keys(str(notes))
    WebDriverWait(browser, 60).until(lambda b: "cannot decode image" in b.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "report-button").get_attribute("disabled")

    browser.find_element(By.ID, "file").send_keys(str(NIH_PNG))
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "report-button").is_enabled())
    canvas = browser.find_element(By.ID, "image")
    assert "00000001_000.png, 512 by 512 pixels" in canvas.get_attribute("aria-label")
    centre = ("return Array.from(document.getElementById('image').getContext('2d')"
              ".getImageData(256, 256, 1, 1).data);")
    before = browser.execute_script(centre)
    level = float(browser.find_element(By.ID, "level-value").text)
    browser.find_element(By.ID, "level").send_keys(Keys.ARROW_LEFT * 20)  # windowing from the keyboard
    assert float(browser.find_element(By.ID, "level-value").text) == level - 20
    assert browser.execute_script(centre) != before

    assert browser.find_element(By.ID, "subject").text == "Image: 00000001_000.png"

    # Every change of the status line, as the browser renders them.
    browser.execute_script("""
        window.statuses = [];
        new MutationObserver(() => window.statuses.push(document.getElementById('status').textContent))
            .observe(document.getElementById('status'), {childList: true, subtree: true, characterData: true});
    """)
    report = model.write_radiologic_report(NIH_PNG, temperature=0.0, max_new_tokens=ANSWER_TOKENS)
    _report_streams_in(browser, server, model.tokenizer, report, waiting="about 00000001_000.png")
    assert _answers(browser) == [report] and _about(browser) == ["00000001_000.png"]
    assert browser.execute_script("return window.statuses")[-1].startswith(
        "Done: the report about 00000001_000.png")

    question = browser.find_element(By.ID, "question")
    question.send_keys("Is the heart enlarged?", Keys.ENTER)
    _wait_until_answered(browser, 2)
    turns = [{"role": "user", "content": prompting.REPORT_PROMPT}, {"role": "assistant", "content": report},
             {"role": "user", "content": "Is the heart enlarged?"}]
    assert _answers(browser)[1] == model.chat(turns, NIH_PNG, temperature=0.0, max_new_tokens=ANSWER_TOKENS)

    assert _about(browser) == ["00000001_000.png"] * 2

    browser.find_element(By.ID, "copy-button").click()
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "status").text
                                     == "The report about 00000001_000.png is copied to the clipboard.")
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))

    # A refused upload (an extremity DICOM) leaves nothing of the previous image usable, and says why.
    browser.find_element(By.ID, "file").send_keys(str(NON_CHEST_DICOM))
    WebDriverWait(browser, 60).until(lambda b: "BodyPartExamined" in b.find_element(By.ID, "status").text)
    status = browser.find_element(By.ID, "status")
    assert "Cannot use RG3_J2KR.dcm, so no image is loaded" in status.text and "under Settings" in status.text
    assert "error" in status.get_attribute("class") and browser.find_element(By.ID, "file").get_property("value") == ""
    assert _answers(browser) == [] and browser.find_element(By.ID, "subject").text == "No image loaded"
    assert all(_disabled(browser, "report-button", "differential-button", "question", "ask-button", "copy-button",
                         "window-controls"))
    assert browser.find_element(By.ID, "image").get_attribute("aria-label") == "No image loaded"
    blank = ("const c = document.getElementById('image');"
             "return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.every(v => v === 0);")
    assert browser.execute_script(blank)
    browser.save_screenshot(str(ARTIFACTS / "serve_page_refused.png"))

    # A question may come first: the image goes with it.
    browser.find_element(By.ID, "file").send_keys(str(NIH_PNG))
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "question").is_enabled())
    browser.find_element(By.ID, "question").send_keys("Is the heart enlarged?", Keys.ENTER)
    _wait_until_answered(browser, 1)
    turns = [{"role": "user", "content": "Is the heart enlarged?"}]
    assert _answers(browser) == [model.chat(turns, NIH_PNG, temperature=0.0, max_new_tokens=ANSWER_TOKENS)]
    assert _about(browser) == ["00000001_000.png"]
    assert _disabled(browser, "copy-button") == [True]  # the copy button copies a report, and none was written

    # The setting that reads a non-frontal file anyway (the server's allow_non_frontal field).
    browser.find_element(By.ID, "allow-non-frontal").click()
    browser.find_element(By.ID, "file").send_keys(str(NON_CHEST_DICOM))
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "report-button").is_enabled())
    assert browser.find_element(By.ID, "subject").text == "Image: RG3_J2KR.dcm" and _answers(browser) == []

    # The window acts on the file's 16-bit values: a band of 16 levels (1000..1015) that the model's 8-bit
    # picture (stretched over 0..60000) shows as one gray is 16 grays once windowed to it.
    values = np.full((128, 128), 1000, np.uint16) + np.arange(128, dtype=np.uint16) % 16
    values[0, 0], values[0, 1] = 0, 60000
    deep = tmp_path / "band16.png"
    Image.fromarray(values).save(deep)
    browser.find_element(By.ID, "file").send_keys(str(deep))
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "subject").text == "Image: band16.png")
    band = ("const d = document.getElementById('image').getContext('2d').getImageData(0, 64, 128, 1).data;"
            "return Array.from(new Set(d.filter((_, i) => i % 4 === 0)));")
    assert len(browser.execute_script(band)) == 1
    browser.execute_script("""
        for (const [id, value] of [['level', 1008], ['width', 16]]) {
            document.getElementById(id).value = value;
            document.getElementById(id).dispatchEvent(new Event('input'));
        }""")
    assert browser.find_element(By.ID, "level-value").text == "1008"
    assert len(browser.execute_script(band)) == 16
    browser.find_element(By.ID, "reset-window").click()
    assert len(browser.execute_script(band)) == 1

    # A study: a lateral DICOM alone is refused naming its tag; chosen with the frontal of its study, both are
    # labelled (view, date), the page says which study it is about, and the report on both streams in.
    browser.find_element(By.ID, "allow-non-frontal").click()  # back to the guard
    files = write_two_studies(tmp_path / "dicom")
    browser.find_element(By.ID, "file").send_keys(str(files["lateral"]))
    WebDriverWait(browser, 60).until(lambda b: "ViewPosition is 'LL'" in b.find_element(By.ID, "status").text)
    assert "Cannot use a_lateral.dcm, so no image is loaded" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "subject").text == "No image loaded"
    browser.find_element(By.ID, "file").send_keys(f"{files['frontal']}\n{files['lateral']}")
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "report-button").is_enabled())
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#study-images button")]
    assert labels == ["b_frontal.dcm: PA, 2024-01-05", "a_lateral.dcm: lateral, 2024-01-05"]
    assert browser.find_element(By.ID, "subject").text == \
        f"Study {CURRENT_UID} of 2024-01-05: b_frontal.dcm, a_lateral.dcm"
    browser.find_elements(By.CSS_SELECTOR, "#study-images button")[1].click()  # the viewer shows the lateral
    assert "a_lateral.dcm" in browser.find_element(By.ID, "image").get_attribute("aria-label")
    report = model.write_radiologic_report([files["frontal"], files["lateral"]], temperature=0.0,
                                           max_new_tokens=ANSWER_TOKENS)
    _report_streams_in(browser, server, model.tokenizer, report, waiting="about the study of 2024-01-05 (2 images)")
    assert _answers(browser) == [report] and _about(browser) == ["the study of 2024-01-05 (2 images)"]
    browser.save_screenshot(str(ARTIFACTS / "serve_page_study.png"))

    # PNG files say neither their view nor their study: the user sets the lateral one's view and gives the indication,
    # and the report is the library's on that study. Marking a file as the prior's relabels it and goes to the server
    # as the part's "prior".
    other = NIH[1] if NIH[1] != NIH_PNG else NIH[0]
    browser.find_element(By.ID, "file").send_keys(f"{NIH_PNG}\n{other}")
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "report-button").is_enabled())
    Select(browser.find_elements(By.CSS_SELECTOR, "#study-images select.view")[1]).select_by_value("LL")
    browser.find_element(By.ID, "indication").send_keys("Cough.")
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#study-images button")]
    assert labels == [f"{NIH_PNG.name}: view not given, no date", f"{other.name}: lateral, no date"]
    report = model.write_radiologic_report(Study.of([NIH_PNG, other], views=["", "LL"], indication="Cough."),
                                           temperature=0.0, max_new_tokens=ANSWER_TOKENS)
    browser.find_element(By.ID, "report-button").click()
    _wait_until_answered(browser, 1)
    assert _answers(browser) == [report] and _about(browser) == ["the study (2 images)"]
    browser.save_screenshot(str(ARTIFACTS / "serve_page_png_study.png"))
    # A prior report starts the conversation anew and, with no image marked as the prior's, is refused by the page.
    browser.find_element(By.ID, "prior-report").send_keys("Clear.")
    browser.find_element(By.ID, "report-button").click()
    assert _answers(browser) == [] and "goes with the prior study's images" in browser.find_element(By.ID, "status").text
    browser.find_elements(By.CSS_SELECTOR, "#study-images input.prior")[0].click()
    assert browser.find_elements(By.CSS_SELECTOR, "#study-images button")[0].text == \
        f"{NIH_PNG.name}: view not given, no date, prior study"
    sent = browser.execute_script("return firstTurn('x').content.slice(1).map(p => [p.view ?? null, p.prior ?? null])")
    assert sent == [[None, True], ["LL", None]]
