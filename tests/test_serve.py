"""`vqatune serve` in a real browser: the server starts on a free loopback port with the tiny model,
headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) uploads a test image,
asks that row's question, and reads both answers: they equal the evaluate stage's answers for the
row. Bad input shows as a message; the explorer filters as the predictions say. A screenshot of each
tab is saved under the test's tmp path."""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest_adapters import make_perturbed_adapter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MODE = "adaptive"
TIMEOUT = 120
# Gradio's pending overlay ("processing | 0.1/0.8s", "0.0s") over an output still showing its old value.
BUSY = re.compile(r"processing|\b\d+(\.\d+)?s\b|^$")


@pytest.fixture(scope="module")
def checkout(tiny_model_dir, processed_dir, tmp_path_factory):
    """A folder laid out like a checkout after `dvc repro`: models, data, metrics/, plots/eval."""
    from vqatune.evaluation.config import EvaluateConfig
    from vqatune.evaluation.plots import plot_by_category, plot_configurations, write_plot_data
    from vqatune.evaluation.run import evaluate_models, write_predictions
    from vqatune.outputs import write_metrics

    root = tmp_path_factory.mktemp("checkout")
    adapter = make_perturbed_adapter(tiny_model_dir, root / "adapter")
    (root / "params.yaml").write_text("evaluate:\n  subset_size: 12\n  max_new_tokens: 8\n"
                                      "  batch_size: 6\n  device: cpu\n")
    cfg = EvaluateConfig(subset_size=12, max_new_tokens=8, batch_size=6, device="cpu")
    report = evaluate_models(tiny_model_dir, adapter, processed_dir, cfg, progress=False)
    write_predictions(report.predictions, root / "metrics" / "predictions")
    write_metrics(root / "metrics" / "eval_by_category.json", report.by_category)
    write_plot_data(report.scores, report.by_category, root / "plots" / "eval")
    plot_configurations(report.scores, root / "plots" / "eval" / "configurations.png")
    plot_by_category(report.by_category, root / "plots" / "eval" / "by_category.png")
    return root


@pytest.fixture(scope="module")
def server(checkout, tiny_model_dir, processed_dir):
    """`vqatune serve --port 0` in a subprocess; yields its URL from the line it prints."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    cmd = [sys.executable, "-m", "vqatune.cli.main", "serve", "--port", "0",
           "--base", str(tiny_model_dir), "--adapter", str(checkout / "adapter"),
           "--data", str(processed_dir), "--metrics", str(checkout / "metrics"),
           "--plots", str(checkout / "plots" / "eval"), "--params", str(checkout / "params.yaml")]
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    log: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    url, deadline = None, time.monotonic() + TIMEOUT
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        log.append(line)
        match = re.search(r"serve: open (http://127\.0\.0\.1:\d+)", line)
        url = match and match.group(1)
    try:
        assert url, "the server printed no URL:\n" + "".join(log)
        assert any("loading the model" in line for line in log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        missing = "chromium or chromedriver not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("VQATUNE_REQUIRE_BROWSER"):  # CI: the browser test must run, not skip
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=TIMEOUT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: condition(d))


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def _value(driver, elem_id):
    return _css(driver, f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")


def _click_label(driver, elem_id, text):
    from selenium.webdriver.common.by import By

    for label in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} label"):
        if label.text.strip() == text:
            label.click()
            return
    raise AssertionError(f"no option {text!r} in #{elem_id}")


def _upload(driver, path):
    _css(driver, "#ask-image input[type=file]").send_keys(str(path))
    _wait(driver, lambda d: Path(path).name in _css(d, "#ask-image").text)


def _ask(driver, question):
    """Type ``question``, press the button, return (base, tuned, message) once the page answered."""
    from selenium.webdriver.common.keys import Keys

    box = _css(driver, "#ask-question textarea")
    box.send_keys(Keys.CONTROL, "a")  # clear() sets the value without telling Gradio
    box.send_keys(Keys.DELETE)
    if question:
        box.send_keys(question)
    before = _css(driver, "#ask-message").text
    _css(driver, "#ask-button").click()
    # Each step of the test expects a message other than the previous one.
    message = _wait(driver, lambda d: (lambda t: t != before and not BUSY.search(t) and t)(
        _css(d, "#ask-message").text.strip()))
    return _value(driver, "base-answer"), _value(driver, "tuned-answer"), message


def test_page_answers_as_evaluation_and_explores_it(server, browser, checkout, processed_dir, tmp_path):
    from datasets import load_from_disk
    from selenium.webdriver.common.by import By

    start = time.monotonic()
    predictions = {p.stem: [json.loads(line) for line in p.open()]
                   for p in (checkout / "metrics" / "predictions").glob("*.jsonl")}
    row = predictions[f"tuned_{MODE}"][0]
    test = load_from_disk(str(processed_dir))["test"]
    image = test[test["img_id"].index(row["img_id"])]["image"]
    image.save(tmp_path / "row.png")
    (tmp_path / "notes.txt").write_text("not an image")

    browser.get(server)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ask-image input[type=file]"))

    # Ask: the row's image and question; both answers are the evaluate stage's.
    _upload(browser, tmp_path / "row.png")
    _click_label(browser, "ask-mode", MODE)
    base, tuned, message = _ask(browser, row["question"])
    assert "Answered" in message, message
    assert tuned == row["prediction"]
    base_row = next(r for r in predictions[f"base_{MODE}"]
                    if (r["img_id"], r["question"]) == (row["img_id"], row["question"]))
    assert base == base_row["prediction"]
    browser.save_screenshot(str(tmp_path / "serve_ask.png"))

    # Errors are messages on the page.
    _, _, message = _ask(browser, "")
    assert "question is empty" in message, message
    assert "Traceback" not in browser.page_source

    # Explore: wrong answers of one category of tuned/adaptive.
    tab = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")
               if "Explore" in b.text)
    tab.click()
    _wait(browser, lambda d: "rows (" in _css(d, "#explore-summary").text)
    category = row["category"]
    _click_label(browser, "explore-configuration", f"tuned_{MODE}")
    _click_label(browser, "explore-category", category)
    _click_label(browser, "explore-result", "wrong")
    expected = [r for r in predictions[f"tuned_{MODE}"]
                if r["category"] == category and not r["exact_match"]]
    text = f"tuned_{MODE}, category {category}, wrong: {len(expected)} rows (0 right, {len(expected)} wrong)"
    _wait(browser, lambda d: text in _css(d, "#explore-summary").text)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#explore-gallery img")) >= len(expected))
    rows_text = _css(browser, "#explore-rows").text
    for r in expected:
        assert r["reference"] in rows_text and r["question"] in rows_text
    categories_text = _css(browser, "#explore-categories").text
    assert category in categories_text
    plots = [i.get_attribute("src") for i in browser.find_elements(By.CSS_SELECTOR, "img")
             if "configurations" in (i.get_attribute("src") or "")]
    assert plots, "the prompt-mode plot is not on the page"
    browser.save_screenshot(str(tmp_path / "serve_explore.png"))
    print(f"screenshots: {tmp_path}; browser part {time.monotonic() - start:.1f} s")
