"""The Dagster UI in a real browser: asset graph → asset → materialize the ``smoke`` partition → metadata.

Debian's ``chromium`` is driven by the ``playwright`` package (no browser download). Screenshots go to
``$EMOTION_SCREENSHOT_DIR`` or ``./screenshots/`` (git-ignored); on failure the current page is saved as
``failure-<step>.png`` there too.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.e2e.conftest import PROJECT, DagsterServer, run_failure_details, runs

pytestmark = pytest.mark.e2e

ASSET = "emotion_dataset"
GROUP = "dataset"
PARTITION = "smoke"
RUN_TIMEOUT = 300
PAGE_TIMEOUT_MS = 60_000
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

RUN_STATUS = """
query ($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status jobName tags { key value } }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}
"""


def screenshot_dir() -> Path:
    folder = Path(os.environ.get("EMOTION_SCREENSHOT_DIR") or PROJECT / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Debian chromium is not installed: run `bash scripts/ci_services.sh` (installs chromium and "
            "postgresql with apt-get) before the end-to-end tests."
        )
    return path


def wait_for_run(server: DagsterServer, run_id: str) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT
    status = ""
    while time.monotonic() < deadline:
        run = server.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]
        if run["__typename"] == "Run":
            status = run["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                return status
        time.sleep(2)
    return status or "TIMEOUT"


def expect_visible_after_reloads(page, make_locator, timeout_ms: int = PAGE_TIMEOUT_MS) -> None:
    """Wait for ``make_locator(page)`` to be visible, reloading the page while it is not.

    The asset page fetches the latest materialization in its own query after the page has loaded; on a
    busy machine that answer can come after a single wait ends, and a reload asks again.
    """
    from playwright.sync_api import expect

    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        try:
            expect(make_locator(page).first).to_be_visible(timeout=10_000)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            page.reload(wait_until="domcontentloaded")


def test_materialize_a_partition_from_the_ui_and_read_its_metadata(dagster_dev: DagsterServer):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    shots = screenshot_dir()
    step = "start"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            step = "asset-graph"
            group_url = f"{dagster_dev.url}/locations/{quote(dagster_dev.location)}/asset-groups/{GROUP}"
            page.goto(group_url, wait_until="domcontentloaded")
            skip = page.get_by_role("button", name="Skip")  # the community modal, if nux is on
            if skip.count():
                skip.first.click()
            node = page.get_by_text(ASSET, exact=True).first
            expect(node).to_be_visible()
            page.screenshot(path=str(shots / "01-asset-graph.png"))

            step = "asset-page"
            node.click()
            page.get_by_role("link", name="View in Asset Catalog").click()
            expect(page).to_have_url(re.compile(rf"/assets/{ASSET}"))
            page.get_by_role("button", name="Materialize…").click()

            step = "partition-dialog"
            dialog = page.get_by_role("dialog").filter(has_text=f"Launch runs to materialize {ASSET}")
            expect(dialog).to_be_visible()
            dialog.get_by_text("Select a partition or create one").click()
            page.get_by_role("menuitem", name=PARTITION).first.click()
            page.keyboard.press("Escape")  # close the partition menu, keep the dialog
            expect(dialog).to_contain_text("1 partition")
            page.screenshot(path=str(shots / "02-partition-dialog.png"))
            dialog.get_by_role("button", name="Launch 1 run").click()

            step = "launched"
            toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
            expect(toast).to_be_visible()
            prefix = re.search(r"Launched run ([0-9a-f]{8})", toast.inner_text()).group(1)
            run_id = next(r["runId"] for r in runs(dagster_dev) if r["runId"].startswith(prefix))
            page.goto(f"{dagster_dev.url}/runs/{run_id}", wait_until="domcontentloaded")
            status = wait_for_run(dagster_dev, run_id)
            assert status == "SUCCESS", (
                f"run {run_id} ended {status}: {run_failure_details(dagster_dev, run_id)}"
            )
            page.reload(wait_until="domcontentloaded")
            expect(page.get_by_text("Success", exact=True).first).to_be_visible()
            page.screenshot(path=str(shots / "03-run-succeeded.png"))

            step = "metadata"
            page.goto(f"{dagster_dev.url}/assets/{ASSET}", wait_until="domcontentloaded")
            expect_visible_after_reloads(page, lambda p: p.get_by_text(PARTITION, exact=True))
            for key in ("path", "dg.row_count", "source_sha256"):
                expect(page.get_by_role("cell", name=key, exact=True)).to_be_visible()
            results = dagster_dev.root / "results" / PARTITION / ASSET / "prompts.parquet"
            expect(page.get_by_text(str(results)).first).to_be_visible()
            final = shots / "ui_materialization.png"
            page.screenshot(path=str(final), full_page=True)
            print(f"screenshots in {shots}; final: {final}")
        except Exception:
            failure = shots / f"failure-{step}.png"
            page.screenshot(path=str(failure), full_page=True)
            print(f"failed at step {step!r}; page {page.url}; screenshot {failure}")
            print(dagster_dev.log_tail(40))
            raise
        finally:
            browser.close()
    assert results.exists()
