"""``make heroku``'s tree deployed the buildpack's way: its requirements in a fresh venv, its Procfile run."""

from __future__ import annotations

import subprocess
import time
import venv

from conftest import (
    BROWSER_TEST,
    CHROMIUM,
    CHROMIUM_FLAGS,
    PYTHON,
    ROOT,
    free_port,
    keep_screenshot,
)
from servers import server

pytestmark = BROWSER_TEST
SLUG_LIMIT_MB = 500  # Heroku's, on the slug after compression
MAX_INSTALLED_MB, MAX_PACKED_MB = 850, 300  # the app's packages and the tree, installed and compressed


def test_heroku_tree_installs_small_and_serves_from_its_procfile(tmp_path):
    # (1) The documented command, writing to a folder of the test's own.
    tree = tmp_path / "heroku"
    made = subprocess.run(
        ["make", "-s", "heroku", f"HEROKU_OUT={tree}", f"PYTHON={PYTHON}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert f'git -C {tree} push "$(git remote get-url heroku)" HEAD:main' in made.stdout, made.stdout
    committed = subprocess.run(["git", "-C", str(tree), "ls-files"], capture_output=True, text=True, check=True).stdout
    assert "models/bundled/model.onnx" in committed.split() and "requirements.txt" in committed.split()
    wanted = [line for line in (tree / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert wanted and not [line for line in wanted if "torch" in line], wanted
    assert not (tree / "train.py").exists() and not (tree / "cifar" / "engine").exists()  # no training code

    # (2)-(3) What the buildpack does: a fresh venv and pip install -r requirements.txt from the tree
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    install = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "-r", "requirements.txt"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    assert not (site / "torch").exists()
    # (6) Measured now, before the app writes its store and caches into the tree. The slug is the
    # installed packages and the tree (not its .git), compressed; the raw figure is printed too.
    du = subprocess.run(["du", "-sbc", str(site), str(tree)], capture_output=True, text=True, check=True)
    installed_mb = int(du.stdout.split()[-2]) / 1e6  # the "total" line, .git included: an upper bound
    slug = tmp_path / "slug.tar.gz"
    subprocess.run(
        ["tar", "-czf", str(slug), "--exclude=.git", "-C", str(site.parent), site.name, "-C", str(tmp_path), tree.name],
        check=True,
    )
    slug_mb = slug.stat().st_size / 1e6
    print(f"heroku slug: {installed_mb:.0f} MB installed (site-packages + tree), {slug_mb:.0f} MB compressed")
    assert slug_mb < SLUG_LIMIT_MB, (installed_mb, slug_mb)
    # Our own ceilings, well inside it: a dependency that doubles the app's size fails here first.
    assert installed_mb < MAX_INSTALLED_MB and slug_mb < MAX_PACKED_MB, (installed_mb, slug_mb)

    # (4) The Procfile's web command, from the tree, in that venv, with a dyno's bare environment:
    # no MLFLOW_TRACKING_URI, so it imports the bundled model into a local store first.
    procfile = (tree / "Procfile").read_text().splitlines()
    web = next(line.split(":", 1)[1].strip() for line in procfile if line.startswith("web:"))
    port = free_port()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PORT": str(port)}
    with server(["bash", "-c", web], port, "/_stcore/health", tmp_path / "web.log", 180, cwd=tree, env=env) as url:
        # (5) Chromium loads the page and predicts a sample.
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(url)
                expect(page.get_by_text("cifar10-classifier version 1")).to_be_visible(timeout=90_000)
                page.get_by_role("button", name="ship").first.click(timeout=60_000)
                expect(page.locator("h3").filter(has_text="ship").first).to_be_visible(timeout=60_000)
                expect(page.get_by_text("confident").first).to_be_visible()
                time.sleep(1.5)  # let the chart finish drawing before the picture
                shot = tmp_path / "heroku_prediction.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
        keep_screenshot(shot)
