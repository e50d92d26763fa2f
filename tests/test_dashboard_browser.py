"""``make dashboard``: Optuna's own dashboard on a study's storage, looked at in Chromium."""

from __future__ import annotations

import optuna
import pytest
from conftest import (
    BROWSER_TEST,
    CHROMIUM,
    CHROMIUM_FLAGS,
    ROOT,
    clean_env,
    free_port,
    keep_screenshot,
)
from servers import server

pytestmark = BROWSER_TEST


@pytest.fixture
def dashboard(tmp_path):
    """A study with four trials in SQLite storage, and ``make dashboard`` serving it on a free port."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="cpu-search", storage=storage, direction="maximize")
    for value in (0.61, 0.72, 0.68):
        trial = study.ask({"optim.lr": optuna.distributions.FloatDistribution(0.05, 2.0, log=True)})
        study.tell(trial, value)
    pruned = study.ask({"optim.lr": optuna.distributions.FloatDistribution(0.05, 2.0, log=True)})
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    port = free_port()
    args = ["make", "--no-print-directory", "dashboard", f"DASHBOARD_PORT={port}"]  # make, optuna-dashboard: one group
    with server(args, port, "/api/studies", tmp_path / "dashboard.log", 120, cwd=ROOT,
                env=clean_env({"OPTUNA_STORAGE": storage})) as url:  # fmt: skip
        yield url


def test_the_dashboard_lists_the_study_and_its_trials(dashboard, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{dashboard}/dashboard")
            expect(page.get_by_text("cpu-search").first).to_be_visible(timeout=60_000)
            page.get_by_text("cpu-search").first.click()
            expect(page.get_by_text("Best Trial (number=1)")).to_be_visible(timeout=60_000)
            page.goto(f"{dashboard}/dashboard/studies/1/trials")
            expect(page.get_by_text("4 Trials")).to_be_visible(timeout=60_000)
            for number in range(4):
                expect(page.get_by_text(f"Trial {number}", exact=True).first).to_be_visible()
            expect(page.get_by_text("Pruned").first).to_be_visible()
            shot = tmp_path / "optuna_dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    keep_screenshot(shot)
