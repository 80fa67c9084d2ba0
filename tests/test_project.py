"""Project-level checks: layout, import direction, settings docs, compose file."""

from __future__ import annotations

import subprocess
import sys

import yaml

from harness import ROOT
from shared.settings import UNPREFIXED, Settings


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
        "heavy = [m for m in ('torch', 'transformers', 'prophet', 'statsmodels', 'sklearn', "
        "'onnxruntime', 'onnx') "
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
    assert names == {
        ("" if name in UNPREFIXED else "MODELWORKERS_") + name.upper()
        for name in Settings.model_fields
    }


def test_compose_file_has_acl_redis_worker_replicas_with_health_checks_and_flower_auth() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "flower", "cli"} <= set(services)
    redis = services["redis"]
    assert "/etc/redis/start-redis.sh" in redis["command"]
    assert "./deploy/redis:/etc/redis:ro" in redis["volumes"]
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]
    assert (ROOT / "deploy" / "redis" / "users.acl").exists()
    for role in ("WORKER", "CLIENT", "ADMIN"):
        assert redis["environment"][f"REDIS_{role}_PASSWORD"].startswith("${REDIS_")
    users = {"worker": "worker", "flower": "admin", "cli": "admin"}
    for service, user in users.items():
        env = services[service]["environment"]
        assert env["MODELWORKERS_REDIS_USERNAME"] == user
        assert env["MODELWORKERS_REDIS_PASSWORD"].startswith(f"${{REDIS_{user.upper()}_PASSWORD:?")
    worker = services["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert {"--without-gossip", "--without-mingle"} <= set(worker["command"])
    assert "modelworkers health" in " ".join(worker["healthcheck"]["test"])
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"]  # Flower reads it itself
    assert "basic-auth" not in " ".join(services["flower"]["command"])  # not where `ps` shows it
    assert services["flower"]["ports"][0].startswith("127.0.0.1:")
    assert (ROOT / services["worker"]["build"] / "Dockerfile").exists()


def test_no_module_of_workers_assigns_a_global_of_another_module() -> None:
    """State of the worker side lives in objects (ServingProcess), not in module globals that
    other modules write: no ``module.NAME = ...`` on a workers module from outside it."""
    import ast

    offences = []
    for path in sorted((ROOT / "workers").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "workers":
                modules |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                modules |= {
                    alias.asname or alias.name
                    for alias in node.names
                    if alias.name.startswith("workers.")
                }
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id in modules
                ):
                    offences.append(f"{path.name}:{node.lineno} {target.value.id}.{target.attr}")
    assert not offences, offences


def test_pre_commit_config_is_valid_and_runs_the_projects_tools() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pre_commit", "validate-config", ".pre-commit-config.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"] for repo in config["repos"] for hook in repo["hooks"]}
    assert hooks == {"ruff", "ruff-format", "mypy"}
