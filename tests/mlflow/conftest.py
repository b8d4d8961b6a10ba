"""A browser test that fails leaves a screenshot of the page it failed on, in
``$FREEZELAB_SCREENSHOTS`` (CI keeps that folder as an artifact), else in the test's
temporary folder; the failure's report names the file."""

import os
from pathlib import Path

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    browser = getattr(item, "funcargs", {}).get("browser")
    if report.when == "call" and report.failed and browser is not None:
        tmp_path = item.funcargs.get("tmp_path")
        folder = Path(os.environ.get("FREEZELAB_SCREENSHOTS") or tmp_path or ".")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"failed-{item.name}.png"
        try:
            browser.switch_to.default_content()
            browser.save_screenshot(str(path))
            report.sections.append(("screenshot", f"{path} ({browser.current_url})"))
        except Exception as err:  # a browser that died says so, the failure stands
            report.sections.append(("screenshot", f"none: {type(err).__name__}: {err}"))
    return report
