"""The MLflow UI as a user reads a study in it: headless Chromium on a real ``mlflow
server`` that tracked a small study. Screenshots of each page go to
``$FREEZELAB_SCREENSHOTS`` (else the test's temporary folder)."""

import json
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import mlflow
import pytest
from servers import Server
from small_study import SMALL_STUDY

from freezelab.mlflow.tracking import ui_page
from freezelab.study import run_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.ray,
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="headless Chromium is not installed (apt-get install chromium chromium-driver; "
        "CI installs it)",
    ),
]


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_session):
    """A study tracked by a real server: its URI, rows and parent run."""
    root = tmp_path_factory.mktemp("ui")
    server = Server(root / "server")
    (root / "server").mkdir()
    server.start()
    previous = Path.cwd()
    os.chdir(root)
    try:
        rows = run_study(
            None, overrides=[*SMALL_STUDY, f"base.mlflow.tracking_uri={server.uri}"]
        ).rows
        yield server.uri, rows
    finally:
        os.chdir(previous)
        server.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def shoot(tmp_path):
    folder = Path(os.environ.get("FREEZELAB_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def save(driver, name: str) -> None:
        driver.save_screenshot(str(folder / f"{name}.png"))

    return save


def _wait(driver, predicate, what: str, timeout: float = 30.0):
    """Poll the page until ``predicate(driver)`` is truthy (the UI loads asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = predicate(driver)
        except Exception:  # an element not rendered yet, a stale one
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what}: {driver.current_url}")
        time.sleep(0.5)


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_the_experiment_opens_on_its_runs_named_by_policy(study, browser, shoot):
    uri, rows = study
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_run(rows[0]["run_id"]).info.experiment_id
    # The page freezelab prints at the end of a study.
    browser.get(ui_page(uri, experiment_id))
    expander = _wait(
        browser,
        lambda d: _css(d, "[role=row] button[data-component-id*='runnamecellrenderer']"),
        "the study's parent run",
    )
    assert "Overview" not in [a.text for a in _css(browser, "nav a, aside a")][:3]
    expander[0].click()
    names = _wait(
        browser,
        lambda d: [
            a.text for a in _css(d, "a[href*='/runs/']") if a.text and a.text.count(" ") >= 1
        ],
        "the study's runs",
    )
    shoot(browser, "runs")
    assert sorted(names) == sorted(f"{r['policy']} {r['variant']}" for r in rows)


def test_a_run_shows_its_datasets_and_its_model_the_last_epochs_metrics(study, browser, shoot):
    uri, rows = study
    client = mlflow.MlflowClient(uri)
    row = rows[-1]
    run = client.get_run(row["run_id"])
    browser.get(ui_page(uri, run.info.experiment_id, run.info.run_id))
    _wait(browser, lambda d: "Training" in d.find_element("tag name", "body").text, "datasets")
    body = browser.find_element("tag name", "body").text
    shoot(browser, "run")
    assert run.info.run_name in body and "digits[5,6,7,8,9]" in body

    (model,) = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    page = ui_page(uri, run.info.experiment_id).replace("/runs?", f"/models/{model.model_id}?")
    browser.get(page)
    cells = _wait(
        browser,
        lambda d: [
            r.text.split("\n") for r in _css(d, "tr, [role=row]") if r.text.startswith("val_acc\n")
        ],
        "the model's val_acc",
    )
    shoot(browser, "model")
    assert float(cells[0][-1]) == pytest.approx(row["val_acc"], abs=1e-12)
    assert model.name == run.info.run_name  # the Models tab tells the policies apart


def test_the_study_report_shows_its_figures_inside_mlflow(study, browser, shoot):
    uri, rows = study
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(rows[0]["run_id"]).data.tags["mlflow.parentRunId"]
    experiment_id = client.get_run(parent).info.experiment_id
    page = ui_page(uri, experiment_id, parent).replace("?", "/artifacts/report/index.html?")
    browser.get(page)
    frame = _wait(browser, lambda d: _css(d, "iframe"), "the report's frame")[0]
    browser.switch_to.frame(frame)
    try:
        images = _wait(
            browser,
            lambda d: d.execute_script(
                "return Array.from(document.images).map(i => [i.alt, i.naturalWidth])"
            ),
            "the report's figures",
        )
        links = browser.execute_script("return Array.from(document.links).map(a => a.href)")
        title = browser.execute_script("return document.title")
    finally:
        browser.switch_to.default_content()
    shoot(browser, "report")
    assert len(images) >= 4 and all(width > 0 for _, width in images), images
    assert "study" in title
    expected = {ui_page(uri, experiment_id, r["run_id"]) for r in rows}
    assert expected <= set(links)


def test_the_compare_view_defaults_to_val_acc(study, browser, shoot):
    uri, rows = study
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_run(rows[0]["run_id"]).info.experiment_id
    ids = [r["run_id"] for r in rows]
    query = urllib.parse.urlencode(
        {"runs": json.dumps(ids), "experiments": json.dumps([experiment_id])}
    )
    browser.get(f"{uri}/#/compare-runs?{query}")
    text = _wait(
        browser,
        lambda d: (t := d.find_element("tag name", "body").text) and "Metrics:" in t and t,
        "the parallel coordinates plot",
    )
    shoot(browser, "compare")
    chosen = text.split("Metrics:", 1)[1].split("Clear All", 1)[0].split()
    assert chosen[0] == "val_acc"
    assert "policy" in text.split("Parameters:", 1)[1].split("Metrics:", 1)[0].split()
