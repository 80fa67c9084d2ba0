"""Project-level checks: layout, import direction, settings docs, compose file."""

from __future__ import annotations

import subprocess
import sys

import yaml

from harness import ROOT
from shared.settings import Settings


def test_shared_imports_neither_celery_nor_tasks_nor_workers() -> None:
    code = (
        "import sys, shared.registry, shared.manifest, shared.schemas, shared.state, "
        "shared.families, shared.settings; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('celery', 'tasks', 'workers')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_importing_the_packages_does_not_import_the_ml_stack() -> None:
    code = (
        "import sys, shared.registry, tasks.sentiment, tasks.forecasting, tasks.clustering; "
        "heavy = [m for m in ('torch', 'transformers', 'prophet', 'statsmodels', 'sklearn') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    names = {
        line.split("=", 1)[0]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert names == {name.upper() for name in Settings.model_fields}


def test_compose_file_has_password_redis_worker_replicas_with_health_checks_and_flower_auth() -> (
    None
):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "flower"} <= set(services)
    assert "--requirepass" in services["redis"]["command"]
    worker = services["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "modelworkers health" in " ".join(worker["healthcheck"]["test"])
    assert worker["environment"]["REDIS_PASSWORD"]
    assert "--basic-auth" in " ".join(services["flower"]["command"])
    assert services["flower"]["ports"][0].startswith("127.0.0.1:")
    assert (ROOT / services["worker"]["build"] / "Dockerfile").exists()
