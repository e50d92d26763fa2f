"""Concurrent promotions end in one registry state, on SQLite and on ``mlflow server`` over PostgreSQL.

Each promoter reads production, decides, then writes; another may write in between. The tests
force that overlap: every promoter reads before any writes, then they write worst first or all at
once behind a barrier. Whatever the order, production must be the best candidate on validation,
``previous`` the next best, and exactly one version in the legacy stage "Production".
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import mlflow
import pytest
from conftest import log_served, served_small_model

from cifar.ops.localstack import MlflowServer, PostgresCluster
from cifar.promote import registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAME = registry.MODEL_NAME
VALS = (0.6, 0.7, 0.8, 0.9)
NOT_MEASURED = registry.Assessment(test_accuracy=0.5, test_data_digest="d", mean_corruption_accuracy=None)


@pytest.fixture(scope="module")
def served(prepared_dir):
    return served_small_model(prepared_dir, ["train.epochs=1"])


@pytest.fixture(scope="module")
def postgres_server():
    folder = Path(tempfile.mkdtemp(prefix="cifar-race-"))  # under /tmp: reachable by the postgres user
    cluster = PostgresCluster(folder).start()
    try:
        server = MlflowServer(cluster.create_database("mlflow"), folder / "artifacts", log=folder / "server.log")
        server.start()
        yield server.url
        server.stop()
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("postgres_server")
        client = mlflow.MlflowClient(uri)  # the server outlives one test: start from an empty registry
        for model in client.search_registered_models():
            client.delete_registered_model(model.name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def candidate(served, experiment: str, val: float):
    data, model = served
    mlflow.set_experiment(experiment)
    with mlflow.start_run():
        uri = log_served(model, data)
        mlflow.log_metrics({"val/best_accuracy": val, "test/accuracy": 0.5}, model_id=uri.removeprefix("models:/"))
        mlflow.set_tags({"model_uri": uri, "git_commit": "abc", "data_digest": "d"})
    return registry.find_best_run([experiment])


def read_then_write(served, write_order) -> dict:
    """A production at 0.5, then four promoters that all read it before any of them writes."""
    first = candidate(served, "first", 0.5)
    registry.register_and_promote(registry.decide(first, NAME, 0.0, False), NAME, assessment=NOT_MEASURED)
    decisions = {val: registry.decide(candidate(served, f"v{val}", val), NAME, 0.0, False) for val in VALS}
    assert all(d.promote for d in decisions.values())  # each beat the 0.5 it read
    write_order(lambda val: registry.register_and_promote(decisions[val], NAME, assessment=NOT_MEASURED))
    return {val: d.candidate.run_id for val, d in decisions.items()} | {0.5: first.run_id}


def worst_last(write) -> None:
    for val in sorted(VALS, reverse=True):  # without the repair, the last writer (0.6) would be production
        write(val)


def all_at_once(write) -> None:
    barrier, errors = threading.Barrier(len(VALS)), []

    def promoter(val):
        try:
            barrier.wait(timeout=60)
            write(val)
        except BaseException as exc:  # noqa: BLE001 (reported below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=promoter, args=(val,)) for val in VALS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors


def assert_one_registry(runs: dict) -> None:
    client = mlflow.MlflowClient()
    versions = {v.run_id: v for v in client.search_model_versions(f"name = '{NAME}'")}
    assert len(versions) == 5  # no promotion lost
    production = client.get_model_version_by_alias(NAME, "production")
    previous = client.get_model_version_by_alias(NAME, "previous")
    assert (production.run_id, previous.run_id) == (runs[0.9], runs[0.8])
    assert [v.run_id for v in versions.values() if v.current_stage == "Production"] == [runs[0.9]]
    assert production.tags["val_accuracy"] == "0.900000"
    assert {v.tags["promotion"] for v in versions.values()} == {"won"}


@pytest.mark.parametrize("write_order", [worst_last, all_at_once], ids=["worst-last", "barrier"])
def test_concurrent_promotions_end_in_the_same_registry(store, served, write_order):
    assert_one_registry(read_then_write(served, write_order))


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_an_alias_another_promoter_created_at_the_same_moment_is_read_again(store, served, monkeypatch):
    """``mlflow server`` on PostgreSQL sets an alias by select-then-insert, so two promoters creating
    ``previous`` at once leave one with a unique-key violation (seen in CI). That one reads again."""
    from mlflow.exceptions import MlflowException

    real, clashes = mlflow.MlflowClient.set_registered_model_alias, []

    def clashing(self, name, alias, version):
        real(self, name, alias, version)  # the other promoter's insert landed first...
        if alias == "previous" and not clashes:  # ...and this one's failed, as the server answers it
            clashes.append(version)
            raise MlflowException(
                "BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "
                '"registered_model_alias_pk"'
            )

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", clashing)
    runs = read_then_write(served, worst_last)
    assert clashes
    assert_one_registry(runs)
