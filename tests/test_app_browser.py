"""End to end in a real browser: streamlit run + Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, clean_env, free_port, run_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"),
]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def app_url(tmp_path):
    env = clean_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT)})
    imported = run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr[-2000:]
    port = free_port()
    server = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "streamlit",
            "run",
            str(ROOT / "streamlit_app" / "app.py"),
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_upload_a_photo_in_chromium(app_url, tmp_path, mini_raw):
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    photo = tmp_path / "my_cat.jpg"
    index = list(mini_raw.test_labels).index(3) + 2  # a real cat photo from the test split
    Image.fromarray(mini_raw.test_images[index]).resize((400, 400), Image.Resampling.BICUBIC).save(photo, quality=92)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(app_url)
            expect(page.get_by_text("cifar10-classifier version 1")).to_be_visible(timeout=60_000)
            page.locator('input[type="file"]').first.set_input_files(str(photo))
            expect(page.get_by_text("my_cat.jpg").first).to_be_visible(timeout=60_000)
            heading = page.locator("h3").filter(has_text="cat")
            expect(heading.first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("confident").first).to_be_visible()
            expect(page.locator('[data-testid*="VegaLiteChart"]').first).to_be_visible(timeout=30_000)
            expect(page.get_by_text("What the model sees (32×32)")).to_be_visible()
            time.sleep(1.5)  # let the chart finish drawing before the picture
            shot = tmp_path / "app_prediction.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    if os.environ.get("CIFAR_ARTIFACTS_DIR"):
        target = Path(os.environ["CIFAR_ARTIFACTS_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)
