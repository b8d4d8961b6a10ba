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
from freezelab.study import run_study, study_page

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


def _runs_table(driver) -> tuple[list[str], list[list[str]]]:
    """The runs table as it shows: its column headers, and each row's cells (a run's
    name, then its columns; a group's name) in the order shown. The grid draws the
    pinned name column and the others as two rows with one row-index each."""
    headers = driver.execute_script(
        "return Array.from(document.querySelectorAll('[role=columnheader]'))"
        ".map(h => h.innerText.trim()).filter(t => t)"
    )
    headers = list(dict.fromkeys(headers))  # a header's cell holds its label's element too
    parts = driver.execute_script(
        "return Array.from(document.querySelectorAll('[role=row][row-index]'))"
        ".map(r => [r.getAttribute('row-index'), r.innerText])"
    )
    rows: dict[int, list[str]] = {}
    for index, text in parts:
        cells = [c for c in text.split("\n") if c and c not in ("Pin run", "Pin group")]
        rows.setdefault(int(index), []).extend(c for c in cells if not c.startswith("#"))
    return headers, [rows[i] for i in sorted(rows)]


def _parent(client, rows) -> str:
    return client.get_run(rows[0]["run_id"]).data.tags["mlflow.parentRunId"]


# The verdict metric, val_acc beside it, and the cost.
METRIC_COLUMNS = {"test_acc", "val_acc", "cost/train_s"}


def test_the_printed_page_opens_on_each_variants_ranking_with_its_cost(study, browser, shoot):
    uri, rows = study
    client = mlflow.MlflowClient(uri)
    # The page the study prints last, opened with no click at all.
    browser.get(study_page(uri, _parent(client, rows)))

    def shown(driver):
        headers, table = _runs_table(driver)
        runs = [r for r in table if not r[0].startswith("Group: ")]
        # Every run's row whole: its name, created, duration, then the metrics' cells.
        width = 3 + len(METRIC_COLUMNS)
        whole = len(runs) == len(rows) and all(len(r) >= width for r in runs)
        # The header row can draw after the rows: wait for both.
        return whole and METRIC_COLUMNS <= set(headers) and (headers, table)

    headers, table = _wait(browser, shown, "the study's runs with their metrics")
    shoot(browser, "study-page")
    # The ranking per variant: each group holds its variant's fine-tuning runs (no
    # parent, no pretraining), best test_acc first; the cost beside it.
    assert METRIC_COLUMNS <= set(headers), headers
    metric_columns = [h for h in headers if h in METRIC_COLUMNS]
    runs = {r["run_id"]: client.get_run(r["run_id"]) for r in rows}
    by_name = {run.info.run_name: run for run in runs.values()}
    groups: dict[str, list[list[str]]] = {}
    for cells in table:
        if cells[0].startswith("Group: "):
            variant = cells[0].removeprefix("Group: ")
            groups[variant] = []
        else:
            groups[variant].append(cells)
    assert set(groups) == {r["variant"] for r in rows}
    for variant, members in groups.items():
        expected = sorted(
            (r for r in rows if r["variant"] == variant), key=lambda r: -r["test_acc"]
        )
        assert [cells[0] for cells in members] == [
            runs[r["run_id"]].info.run_name for r in expected
        ]
        for cells in members:
            values = dict(zip(metric_columns, cells[-len(metric_columns) :], strict=True))
            run = by_name[cells[0]]
            assert float(values["test_acc"]) == pytest.approx(run.data.metrics["test_acc"])
            assert float(values["cost/train_s"]) == pytest.approx(run.data.metrics["cost/train_s"])
    # Short names: the policy and the variant, the whole label in a tag.
    for row in rows:
        run = runs[row["run_id"]]
        policy, variant = run.info.run_name.split(" · ")
        assert policy == row["policy"] and row["variant"].endswith(variant)
        assert run.data.tags["freezelab.label"] == f"{row['policy']} {row['variant']}"


def test_the_study_states_its_answer_in_its_description(study, browser, shoot):
    uri, rows = study
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(_parent(client, rows))
    browser.get(ui_page(uri, parent.info.experiment_id, parent.info.run_id))
    blocks = _wait(
        browser,
        lambda d: d.execute_script(
            "const box = document.querySelector('.note-editor-preview-content');"
            "return box && Array.from(box.children).map(c => [c.tagName, c.innerText]);"
        ),
        "the parent's description",
    )
    shoot(browser, "study-parent")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    # A heading and a table per variant first, then the summary in words.
    for index, variant in enumerate(variants):
        heading, table = blocks[2 * index], blocks[2 * index + 1]
        assert heading[0] == "P" and heading[1].startswith(f"{variant}: ")
        assert table[0] == "TABLE"
        assert table[1].splitlines()[0].split("\t") == [
            "policy",
            "test_acc",
            "cost/train_s per run",
        ]
        winner = parent.data.tags[f"freezelab.best.{variant}.policy"]
        assert table[1].splitlines()[1].startswith(winner + "\t")
    assert "freezelab.variant" not in parent.data.tags
    assert len(parent.data.tags["mlflow.note.content"]) < 8000


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
        links = browser.execute_script(
            "return Array.from(document.links).map(a => [a.href, a.target, a.innerText])"
        )
        title = browser.execute_script("return document.title")
        headers = browser.execute_script(
            "return Array.from(document.querySelectorAll('#settings th, #runs th'))"
            ".map(h => h.innerText)"
        )
        variants = browser.execute_script(
            "return Array.from(document.querySelectorAll('#runs tbody tr'))"
            ".map(r => r.cells[0].innerText)"
        )
        sandboxed = browser.execute_script("return !document.getElementById('sandboxed').hidden")
    finally:
        browser.switch_to.default_content()
    shoot(browser, "report")
    assert len(images) >= 4 and all(width > 0 for _, width in images), images
    assert "study" in title
    assert headers.count("target variant") == 2
    assert sorted(variants) == sorted(r["variant"] for r in rows)
    # The links point at the server this page came from and replace the page; MLflow's
    # frame cannot navigate (sandbox="allow-scripts"), so the page says how to open them.
    assert sandboxed
    expected = {ui_page(uri, experiment_id, r["run_id"]) for r in rows}
    assert expected <= {href for href, _, _ in links}
    assert {target for _, target, _ in links} == {"_top"}
    (study_link,) = [href for href, _, text in links if "study's runs" in text]
    assert study_link == study_page(uri, parent)
    # A link works when opened (from the context menu, or from the report on its own).
    run = rows[0]
    browser.get(ui_page(uri, experiment_id, run["run_id"]))
    _wait(browser, lambda d: run["run_name"] in d.find_element("tag name", "body").text, "the run")


def test_the_registered_model_says_what_it_holds(study, browser, shoot):
    uri, rows = study
    registry = mlflow.MlflowClient(uri, registry_uri=uri)
    version = registry.get_model_version_by_alias("transfer-study-best", "champion")
    run = next(r for r in rows if r["run_id"] == version.run_id)
    assert version.tags["freezelab.policy"] == run["policy"]
    assert version.tags["freezelab.variant"] == run["variant"]
    assert version.tags["freezelab.verdict"].startswith("test_acc ")
    assert version.tags["freezelab.study"] in version.description
    base = ui_page(uri, "0").split("#", 1)[0]
    browser.get(f"{base}#/models/transfer-study-best/versions/{version.version}")
    _wait(
        browser,
        lambda d: version.description in d.find_element("tag name", "body").text,
        "the version's description",
    )
    shoot(browser, "model-version")


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
    params = text.split("Parameters:", 1)[1].split("Metrics:", 1)[0].split()
    assert "policy" in params
    # No axis that only one policy has (gradual's `every`, lp_ft's `probe_epochs`).
    assert not [p for p in params if p.startswith("policy.") and p != "policy.type"], params


def test_the_chart_mode_shows_the_verdict_and_the_cost_before_the_diagnostics(
    study, browser, shoot
):
    uri, rows = study
    client = mlflow.MlflowClient(uri)
    browser.get(study_page(uri, _parent(client, rows)) + "&compareRunsMode=CHART")

    def sections(driver):
        # Each section's header reads "<name>\n(<charts>)": the names in page order.
        lines = driver.find_element("tag name", "body").text.splitlines()
        found = [a for a, b in zip(lines, lines[1:], strict=False) if b[:1] + b[-1:] == "()"]
        return len(found) >= 4 and "drift" in found and found

    found = _wait(browser, sections, "the chart sections")
    shoot(browser, "study-charts")
    # MLflow's own order would be alphabetical with the unprefixed metrics last.
    assert found[:2] == ["Model metrics", "cost"], found
    assert found.index("shifted/test_acc") < found.index("drift") < found.index("run"), found
    # The verdict metric's chart first in its section, val_acc next.
    lines = browser.find_element("tag name", "body").text.splitlines()
    start = lines.index("Model metrics")
    names = {"test_acc", "val_acc", "val_loss", "train_loss", "train_acc", "test_loss"}
    titles = [line for line in lines[start : lines.index("cost", start)] if line in names]
    assert titles[:2] == ["test_acc", "val_acc"], titles
