"""The web page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): upload the NIH
radiograph, see it in the viewer, window it from the keyboard, get the report streamed, ask a follow-up with
the keyboard, copy the report. Writes a screenshot to $TEST_ARTIFACTS (default test-artifacts/).

Answers come from the tiny model with EOS never ending them (every answer is exactly its token budget long),
paced so that the stream is seen arriving; the texts shown must equal the library's greedy answers.
"""

import os
import shutil
import time
from pathlib import Path

import pytest

from cxrllava_jax.domain import prompting
from cxrllava_jax.inference.engine import Engine
from cxrllava_jax.serving.app import create_app
from cxrllava_jax.serving.limits import Limits
from tests.serving_fixtures import NIH_PNG, LiveServer, endless_tiny_model

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"):  # .ci/run installs them: CI never skips
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402  (the skip above comes first)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "page-test-key"
ANSWER_TOKENS = 32
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


class PacedEngine(Engine):
    """Pauses after each chunk of tokens, so that a browser polling the page sees the text grow."""

    def step(self, *args, **kwargs):
        super().step(*args, **kwargs)
        time.sleep(0.15)


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


def _wait_until_answered(browser, count: int):
    WebDriverWait(browser, 120).until(
        lambda b: len(_answers(b)) == count and b.find_element(By.ID, "status").text.startswith("Done"))


def test_report_and_follow_up_in_the_browser(model, server, browser):
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
    browser.find_element(By.ID, "level").send_keys(Keys.ARROW_LEFT * 20)  # windowing from the keyboard
    assert browser.find_element(By.ID, "level-value").text == "108"
    assert browser.execute_script(centre) != before

    # Every change of the answer's text, as the browser renders it.
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('#conversation .assistant p');
            if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
        }).observe(document.getElementById('conversation'), {childList: true, subtree: true, characterData: true});
    """)
    browser.find_element(By.ID, "report-button").click()
    _wait_until_answered(browser, 1)
    report = model.write_radiologic_report(NIH_PNG, temperature=0.0, max_new_tokens=ANSWER_TOKENS)
    assert _answers(browser) == [report]
    partial = [text for text in browser.execute_script("return window.seen") if text and text != report]
    assert len(set(partial)) >= 2 and all(report.startswith(text) for text in partial)

    question = browser.find_element(By.ID, "question")
    question.send_keys("Is the heart enlarged?", Keys.ENTER)
    _wait_until_answered(browser, 2)
    turns = [{"role": "user", "content": prompting.REPORT_PROMPT}, {"role": "assistant", "content": report},
             {"role": "user", "content": "Is the heart enlarged?"}]
    assert _answers(browser)[1] == model.chat(turns, NIH_PNG, temperature=0.0, max_new_tokens=ANSWER_TOKENS)

    browser.find_element(By.ID, "copy-button").click()
    WebDriverWait(browser, 10).until(
        lambda b: b.find_element(By.ID, "status").text == "Report copied to the clipboard.")
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))
