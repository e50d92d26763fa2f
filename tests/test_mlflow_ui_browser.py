"""The MLflow UI on a real training run and a real study, looked at in Chromium (``make ui``).

What a user browsing their runs sees: the run page lists the logged model and its metrics,
metric charts grouped into sections, system metrics, the experiment's Models tab with the
metrics beside each model, the registered model's description, and a study's parent run.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    BROWSER_TEST,
    CHROMIUM,
    CHROMIUM_FLAGS,
    PYTHON,
    ROOT,
    clean_env,
    free_port,
    keep_screenshot,
    run_cli,
    stop_process_group,
)

pytestmark = BROWSER_TEST


@pytest.fixture(scope="module")
def browsed_store(tmp_path_factory, prepared_dir):
    """A store as a user leaves it: a training run, promoted; a two-trial study; ``make ui`` serving it."""
    root = tmp_path_factory.mktemp("ui")
    env = clean_env(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "CIFAR_DATA": str(prepared_dir),
            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        }
    )
    trained = run_cli(
        [str(ROOT / "train.py"), "--experiment", "smoke", "--epochs", "3", "--no-progress"], env=env, cwd=root
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    promoted = run_cli([str(ROOT / "register.py"), "--robustness-images", "0"], env=env, cwd=root)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr[-3000:]
    tuned = run_cli(
        [
            str(ROOT / "tune.py"),
            *("--experiment", "smoke", "--space", "cpu", "--n-trials", "2", "--epochs-per-trial", "1"),
            *("--storage", f"sqlite:///{root / 'optuna.db'}", "--study-name", "ui-study"),
        ],
        env=env,
        cwd=root,
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    (trained_run,) = [r for r in runs if "optuna_study" not in r.data.tags]
    (parent,) = [r for r in runs if r.data.tags.get("optuna_study") and "mlflow.parentRunId" not in r.data.tags]
    port = free_port()
    server = subprocess.Popen(  # what `make ui` runs, on this store
        [PYTHON, "-m", "mlflow", "ui", "--backend-store-uri", env["MLFLOW_TRACKING_URI"], "--host", "127.0.0.1"]
        + ["--port", str(port)],
        cwd=root,
        env=clean_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # mlflow, then its workers: stopped as one group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow ui did not start")
        yield {"url": url, "client": client, "run": trained_run, "parent": parent, "root": root}
    finally:
        stop_process_group(server)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # the UI fetches, then draws: seconds on 2 loaded cores
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, width: int = 1500, height: int = 2400):
    """A page in the UI's "Model training" view (its own links carry ``workflowType``; a fresh browser shows GenAI)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(60_000)
    # the MLflow Assistant panel opens by itself on a browser's first visit and covers a third of
    # the page; the UI remembers that it did so here, as for a user who has closed it once
    page.add_init_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
    page.goto(url + ("&" if "?" in url else "?") + "workflowType=machine_learning")
    return page


def shoot(page, tmp_path: Path, name: str) -> None:
    shot = tmp_path / f"mlflow_ui_{name}.png"
    page.wait_for_timeout(1500)  # charts draw after their data arrives
    page.screenshot(path=str(shot))
    keep_screenshot(shot)


def test_the_run_page_lists_the_model_and_its_metrics(browsed_store, browser, tmp_path):
    from playwright.sync_api import expect

    run = browsed_store["run"]
    base = f"{browsed_store['url']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    page = open_page(browser, base)
    expect(page.get_by_text("Logged models (1)")).to_be_visible()
    expect(page.get_by_text("cifar10-classifier").first).to_be_visible()  # registered, and named so
    expect(page.get_by_text("validation accuracy", exact=False).first).to_be_visible()  # the run's description
    search = page.get_by_placeholder("Search metrics")
    for metric in ("val/best_accuracy", "test/accuracy", "test/ece_calibrated", "ood/auroc_noise"):
        search.fill(metric)
        row = page.get_by_role("row").filter(has=page.get_by_text(metric, exact=True))
        expect(row.first).to_be_visible()
        expect(row.first.get_by_text("model", exact=True)).to_be_visible()  # the Models column: linked
    search.fill("val/")  # the per-epoch curve belongs to the run ("-"), the best value to the model
    shoot(page, tmp_path, "run_page")
    page.close()

    page = open_page(browser, f"{base}/model-metrics", 1500, 3000)
    # MLflow's chart sections, by the name before "/": val/{accuracy,loss,best_accuracy,best_epoch}, ...
    for section, charts in (("val", 4), ("train", 6), ("test", 8), ("ood", 8)):
        expect(page.get_by_text(re.compile(rf"^{section}\s*\({charts}\)$")).first).to_be_attached()
    page.get_by_text(re.compile(r"^val\s*\(4\)$")).first.scroll_into_view_if_needed()
    expect(page.get_by_role("heading", name="best_accuracy", exact=True)).to_be_visible()  # charts draw when in view
    shoot(page, tmp_path, "run_model_metrics")
    page.close()

    page = open_page(browser, f"{base}/system-metrics", 1500, 1500)
    expect(page.get_by_text("cpu_utilization_percentage").first).to_be_visible()
    shoot(page, tmp_path, "run_system_metrics")
    page.close()


def test_the_models_tab_shows_each_model_with_its_metrics(browsed_store, browser, tmp_path):
    from playwright.sync_api import expect

    run = browsed_store["run"]
    page = open_page(browser, f"{browsed_store['url']}/#/experiments/{run.info.experiment_id}/models", 2600, 900)
    expect(page.get_by_role("link", name="model", exact=True).first).to_be_visible()
    expect(page.get_by_text("cifar10-classifier").first).to_be_visible()
    for column in ("test/accuracy", "test/ece"):  # the first columns; the table draws more as it scrolls
        expect(page.get_by_text(column, exact=True).first).to_be_visible()
    expect(page.get_by_text("cifar10-test").first).to_be_visible()  # metrics grouped by the split they measured
    shoot(page, tmp_path, "models_tab")

    page.goto(f"{browsed_store['url']}/#/experiments/{run.info.experiment_id}/runs?compareRunsMode=CHART")
    for section, charts in (("val", 4), ("train", 6), ("test", 8)):  # the experiment's charts: same sections
        expect(page.get_by_text(re.compile(rf"^{section}\s*\({charts}\)$")).first).to_be_attached()
    shoot(page, tmp_path, "experiment_charts")
    page.close()


def test_the_registered_model_says_what_it_takes_and_gives(browsed_store, browser, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, f"{browsed_store['url']}/#/models/cifar10-classifier", 1500, 1300)
    expect(page.get_by_text("uint8, N x 32 x 32 x 3", exact=False)).to_be_visible()
    for output in ("label", "probabilities", "in_distribution", "ood_score", "logits"):
        expect(page.get_by_text(output, exact=True).first).to_be_visible()
    expect(page.get_by_text("production").first).to_be_visible()
    shoot(page, tmp_path, "registered_model")
    page.close()


def test_the_study_parent_run_shows_its_trials(browsed_store, browser, tmp_path):
    from playwright.sync_api import expect

    parent = browsed_store["parent"]
    page = open_page(
        browser, f"{browsed_store['url']}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    )
    expect(page.get_by_text("trials/complete")).to_be_visible()
    expect(page.get_by_text("val/best_accuracy")).to_be_visible()
    expect(page.get_by_text("Optuna study", exact=False).first).to_be_visible()  # its description
    for number in (0, 1):
        expect(page.get_by_text(f"ui-study-trial-{number}").first).to_be_visible()  # the child runs
    expect(page.get_by_text("sampler.name").or_(page.get_by_text("space.optim.lr")).first).to_be_visible()
    shoot(page, tmp_path, "study_parent")
    page.close()
