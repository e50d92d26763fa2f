"""End to end in a real browser: streamlit run + Debian's Chromium driven by Playwright."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import CHROMIUM, CHROMIUM_FLAGS, PYTHON, ROOT, clean_env, free_port, keep_screenshot, run_cli

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"),
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
    keep_screenshot(shot)


def test_uniform_noise_is_flagged_none_of_these_in_chromium(app_url, tmp_path):
    """The issue's case: a 128x128 uniform-noise PNG was answered "airplane, 61.6% confident"."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    noise = tmp_path / "static_noise.png"
    Image.fromarray(np.random.default_rng(11).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(noise)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(app_url)
            expect(page.get_by_text("cifar10-classifier version 1")).to_be_visible(timeout=60_000)
            page.locator('input[type="file"]').first.set_input_files(str(noise))
            expect(page.locator("h3").filter(has_text="none of these?").first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("This does not look like any of the 10 classes").first).to_be_visible()
            expect(page.locator('[data-testid*="VegaLiteChart"]').first).to_be_visible(timeout=30_000)
            time.sleep(1.5)
            shot = tmp_path / "app_none_of_these.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    keep_screenshot(shot)


def test_twenty_concurrent_sessions_while_a_new_version_is_promoted(app_url, tmp_path, mini_raw, monkeypatch):
    """20 browser sessions upload photos at once; meanwhile production moves to a new version."""
    import asyncio

    import mlflow
    from PIL import Image
    from playwright.async_api import async_playwright, expect

    photos = []
    for i in range(20):
        path = tmp_path / f"photo_{i:02d}.png"
        Image.fromarray(mini_raw.test_images[i]).resize((128, 128)).save(path)
        photos.append(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the app's store
    mlflow.set_tracking_uri(None)
    client = mlflow.MlflowClient()
    first = client.get_model_version_by_alias("cifar10-classifier", "production")

    async def session(browser, photo: Path) -> str:
        context = await browser.new_context(viewport={"width": 1200, "height": 900})
        context.set_default_timeout(180_000)  # 20 pages at once on 2 cores: the first paint can take a while
        try:
            page = await context.new_page()
            await page.goto(app_url)
            await expect(page.get_by_text("cifar10-classifier version").first).to_be_visible(timeout=120_000)
            upload = page.locator('input[type="file"]').first
            await expect(upload).to_be_attached(timeout=120_000)
            await upload.set_input_files(str(photo), timeout=120_000)
            # After the promotion every session re-reads the registry and answers with the new
            # version: 20 Chromium pages and the app on 2 cores can take minutes (CI saw > 120 s).
            await expect(page.get_by_text("confident").first).to_be_visible(timeout=300_000)
            text = await page.locator("body").inner_text()
            assert "Traceback" not in text and "Error" not in text, text[:2000]
            return text
        finally:
            await context.close()

    async def promote_meanwhile() -> str:
        await asyncio.sleep(5)
        new = client.create_model_version("cifar10-classifier", first.source, run_id=first.run_id)
        client.set_registered_model_alias("cifar10-classifier", "production", new.version)
        return new.version

    async def drive() -> tuple[list[str], str]:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(session(browser, photo) for photo in photos), promote_meanwhile()), timeout=720
                )
            finally:
                await browser.close()
        return results[:-1], results[-1]

    started = time.monotonic()
    pages, new_version = asyncio.run(drive())
    elapsed = time.monotonic() - started
    assert len(pages) == 20 and all("confident" in text for text in pages)
    assert str(new_version) == "2"
    print(f"20 concurrent sessions answered in {elapsed:.1f} s")
