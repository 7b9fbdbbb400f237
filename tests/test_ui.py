"""The Prefect UI as a user sees it: `aot serve`, then headless Chromium (Debian's chromium,
driven by Playwright) finds the deployments, starts `bootstrap` at a small size from the run
form, sees it complete and its artifact listed. Screenshots go to the test's tmp folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, prefect_home, stop_session, warm_default_defender
from storage import ShardStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def served(tmp_path):
    port = free_port()
    ready = tmp_path / "ready"
    env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "home"))
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aot.cli", "serve", "--port", str(port), "--ready-file", str(ready)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "aot serve was not ready in 240 s"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_session(proc)
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_the_ui_lists_the_deployments_and_runs_bootstrap(served, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (requirements.txt)")
    sync_playwright, PlaywrightTimeout = playwright.sync_playwright, playwright.TimeoutError
    shots = tmp_path / "screenshots"
    shots.mkdir()
    root = tmp_path / "data"
    # bootstrap's implant stage needs the warmed base defender (minutes on 2 cores, once per cache);
    # have it before the clock below starts, so the 300 s measure the UI and the run, not the warm-up
    warm_default_defender()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{served}/deployments", wait_until="networkidle")
        page.get_by_text("Deployments", exact=True).first.wait_for()
        deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
        # every deployment prefect.yaml declares; the count arrives after the page's first paint (on a
        # loaded machine the page read "0 Deployments" for a moment), so wait for it
        try:
            page.get_by_text(f"{len(deployments)} Deployments", exact=True).wait_for(timeout=60_000)
        except PlaywrightTimeout:
            pytest.fail(
                f"the UI did not list {len(deployments)} deployments in 60 s; it reads:\n"
                + page.inner_text("body")[:800]
            )
        for name in ("bootstrap", "bootstrap-nightly", "coevolution", "generate-curriculum"):
            assert page.get_by_role("link", name=name, exact=True).count() >= 1, name
        page.screenshot(path=str(shots / "1-deployments.png"))

        # Start bootstrap from its run form, at a small size, into this test's folder.
        page.get_by_role("link", name="bootstrap", exact=True).first.click()
        page.wait_for_load_state("networkidle")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()
        page.wait_for_load_state("networkidle")
        page.get_by_role("textbox").nth(1).fill(str(root))  # textbox 0 is the run name
        page.get_by_role("button", name="dict", exact=True).first.click()  # overrides: a JSON editor
        page.locator("textarea.p-code-input__textarea").first.fill('{"source.num_scenes": 16, "source.shard_size": 8}')
        page.screenshot(path=str(shots / "2-run-form.png"), full_page=True)
        page.get_by_text("Submit", exact=True).click()
        # The form's own URL (/deployments/deployment/<id>/run) already matches a deployment-page
        # glob, so wait until the UI has left the form: on a loaded CI machine the submission took
        # over 3 s and the polling loop's reload below then discarded it, leaving a blank form.
        try:
            page.wait_for_url(
                lambda url: "/deployments/deployment/" in url and not url.split("?")[0].endswith("/run"),
                timeout=120_000,
            )
        except PlaywrightTimeout:
            pytest.fail("the run form did not submit in 120 s; the page reads:\n" + page.inner_text("body")[:2000])

        deadline = time.monotonic() + 300
        while "Completed" not in page.inner_text("body"):
            assert not any(s in page.inner_text("body") for s in ("Failed", "Crashed")), page.inner_text("body")[:2000]
            # on timeout, say what the page shows (the run's state: scheduled, pending, running ...)
            assert time.monotonic() < deadline, (
                "the bootstrap run did not complete in 300 s; the page reads:\n" + page.inner_text("body")[:2000]
            )
            page.wait_for_timeout(3000)
            page.reload(wait_until="networkidle")
        page.screenshot(path=str(shots / "3-completed.png"))

        page.locator("a[href*='/runs/flow-run/']").first.click()
        page.wait_for_load_state("networkidle")
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("bootstrap-stages").first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "4-artifacts.png"), full_page=True)
        browser.close()
    # The run wrote the AOT-SFT version where the form said.
    store = ShardStore(str(root))
    assert len(store.versions(stage="export")) == 1
