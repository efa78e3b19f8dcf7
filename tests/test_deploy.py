"""The production instance config (deploy/dagster.yaml) loads against a real PostgreSQL."""

import shutil
from pathlib import Path

import dagster as dg
import pytest

DEPLOY = Path(__file__).parent.parent / "deploy" / "dagster.yaml"


@pytest.mark.postgres
def test_production_instance_config_loads_on_postgres(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(DEPLOY, tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_PG_URL", postgres_url)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_retries_enabled and instance.run_monitoring_enabled
        instance.event_log_storage.set_concurrency_slots("gpu", 2)
        info = instance.event_log_storage.get_concurrency_info("gpu")
        assert info.slot_count == 2
