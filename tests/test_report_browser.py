"""The report page in a real browser: headless Chromium (Debian's package, driven by Playwright
with `executable_path`, since Playwright's own browser download is not reachable everywhere).
The page loads, every image decodes, and the console stays free of errors. Skips, saying why,
where Playwright or a Chromium binary is missing (`make test` installs both where it can)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_report import distill_run, held_out_run, pipeline_dir, plain_report  # noqa: F401

from deltakd_cli.report.run import write_report

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    """Debian's chromium (or $DELTAKD_CHROMIUM), or skip naming what is missing."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                        "(pip install 'deltakd[browser]')")  # fmt: skip
    path = os.environ.get("DELTAKD_CHROMIUM") or next(
        (found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None
    )
    if not path:
        pytest.skip("no Chromium binary (apt-get install chromium) to check the page in")
    return path


def open_page(index: Path, screenshot: Path | None = None) -> dict:
    """Load the page; return its console errors, failed requests and each image's natural
    size."""
    from playwright.sync_api import Error, sync_playwright

    errors: list[str] = []
    failed: list[str] = []
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"]
            )
        except Error as error:
            pytest.skip(f"Chromium does not start here: {str(error).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: failed.append(request.url))
            response = page.goto(index.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => [i.getAttribute('src'), i.naturalWidth])"
            )
            title = page.title()
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"ok": response is not None and response.ok, "title": title, "images": images,
            "errors": errors, "failed": failed}  # fmt: skip


def test_the_report_page_in_a_browser(distill_run, plain_report, pipeline_dir, tmp_path):  # noqa: F811
    chromium()
    index = write_report([distill_run, plain_report, pipeline_dir], tmp_path / "report")
    screenshot = os.environ.get("DELTAKD_REPORT_SCREENSHOT")  # docs/images/report-page.png
    seen = open_page(index, Path(screenshot) if screenshot else None)
    assert seen["ok"] and seen["title"] == "deltakd report"
    sources = sorted(src for src, _ in seen["images"])
    assert sources == ["differences.png", "loss.png", "rougeL.png"]
    assert all(width > 0 for _, width in seen["images"]), seen["images"]
    assert seen["errors"] == [] and seen["failed"] == []


def test_a_missing_image_is_seen(distill_run, tmp_path):  # noqa: F811
    """The check can fail: a page whose image is gone shows naturalWidth 0 and a failed
    request."""
    chromium()
    index = write_report([distill_run], tmp_path / "report")
    (index.parent / "loss.png").unlink()
    seen = open_page(index)
    assert seen["images"] == [["loss.png", 0]]
    assert seen["failed"] or seen["errors"]
