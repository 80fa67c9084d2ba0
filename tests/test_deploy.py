"""Deployment files, checked without Docker or a cluster: the Dockerfile's layer order, build
arguments and user; what .dockerignore keeps out of the build context; the Kubernetes manifests,
rendered as kustomize renders them and validated against Kubernetes' own schemas."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import ROOT
from shared.settings import ENV_PREFIX, Settings

KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests are validated against


# ---- Dockerfile -------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            instruction, _, args = pending.strip().partition(" ")
            steps.append((instruction.upper(), args.strip()))
        pending = ""
    return steps


def first(steps: list[tuple[str, str]], test: Any) -> int:
    return next(i for i, step in enumerate(steps) if test(*step))


def copies(steps: list[tuple[str, str]]) -> list[tuple[int, list[str]]]:
    """(index, sources) of each COPY (without --flags; the last word is the destination)."""
    found = []
    for i, (instruction, args) in enumerate(steps):
        if instruction == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            found.append((i, words[:-1]))
    return found


def test_dockerfile_installs_the_dependencies_in_layers_before_the_code() -> None:
    steps = dockerfile()
    torch = first(
        steps, lambda ins, args: ins == "RUN" and "pip install" in args and "torch" in args
    )
    deps = first(steps, lambda ins, args: ins == "RUN" and "pyproject.toml" in args)
    code = first(
        steps,
        lambda ins, args: (
            ins == "COPY" and re.search(r"(^|\s)(shared|tasks|workers)(/|\s|$)", args)
        ),
    )
    assert torch < deps < code, steps
    # before the dependencies are installed, nothing but pyproject.toml is in the image, so an
    # edit of the code (or the README) never invalidates the dependency layers
    assert [sources for i, sources in copies(steps) if i < deps] == [["pyproject.toml"]]
    assert "pip install --no-deps" in " ".join(args for ins, args in steps[code:] if ins == "RUN")
    for _, sources in copies(steps):  # no `COPY . .`: only what the image needs
        assert "." not in sources and "./" not in sources


def test_dockerfile_build_arguments_choose_the_torch_build() -> None:
    steps = dockerfile()
    start = first(steps, lambda ins, args: ins == "FROM")
    args = {a.split("=")[0]: a.partition("=")[2] for ins, a in steps[start:] if ins == "ARG"}
    assert {"TORCH_VARIANT", "TORCH_VERSION", "TORCH_INDEX_URL", "EXTRAS"} <= set(args)
    assert args["TORCH_VARIANT"] == "cpu"  # the CPU image by default
    assert "flower" in args["EXTRAS"]  # Flower runs from the same image
    torch = next(a for ins, a in steps if ins == "RUN" and "torch==" in a)
    # cpu: PyTorch's CPU index unless TORCH_INDEX_URL says otherwise; cuda: PyPI's CUDA build
    assert (
        "cpu)" in torch
        and "cuda)" in torch
        and "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" in torch
    )
    assert "${TORCH_VERSION}" in torch
    version = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert version is not None and args["TORCH_VERSION"] == version.group(1)


def test_dockerfile_runs_as_a_non_root_user() -> None:
    steps = dockerfile()
    users = [(i, args) for i, (ins, args) in enumerate(steps) if ins == "USER"]
    assert users and users[-1][1] not in ("root", "0")
    assert users[-1][0] > max(i for i, (ins, _) in enumerate(steps) if ins in ("RUN", "COPY"))
    assert any(ins == "CMD" for ins, _ in steps)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it, decides;
    ``!`` patterns bring paths back; ``*`` stays within one folder, ``**`` crosses folders."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        keep = raw.startswith("!")
        pattern = raw[1:] if keep else raw
        compiled = regex(pattern.strip("/"))
        if any(compiled.match(c) for c in candidates):
            ignored = not keep
    return ignored


def test_dockerignore_keeps_local_state_out_and_everything_the_image_copies_in() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "models/cache/hub/models--x/config.json",
        "bench/.cache/minilm/model.bin",
        "bench/results/run.json",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        "shared/__pycache__/settings.cpython-311.pyc",
        "modelworkers.egg-info/PKG-INFO",
        ".env",
        "tests/test_project.py",
    ):
        assert dockerignored(path, patterns), path
    steps = dockerfile()
    sources = [s for _, group in copies(steps) for s in group]
    tracked = subprocess.run(
        ["git", "ls-files", "--", *sources], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "models/sentiment/model.toml" in tracked and "workers/cli.py" in tracked
    assert [path for path in tracked if dockerignored(path, patterns)] == []


# ---- Kubernetes ---------------------------------------------------------------------------
def render(folder: Path) -> list[dict[str, Any]]:
    """What `kustomize build folder` gives for a kustomization that only lists resources (files,
    or folders with a kustomization of the same kind): those resources, in order."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    # anything else (patches, generators, namePrefix...) would transform the resources, and this
    # renderer would no longer give what kustomize gives
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, set(kustomization)
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (folder / entry).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[dev]' (make test)")
    return kubernetes_validate


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def probe_command(container: dict[str, Any], probe: str) -> str:
    return " ".join(container[probe]["exec"]["command"])


@pytest.mark.parametrize("overlay", ["base", "keda", "hpa"])
def test_rendered_manifests_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    kubernetes_validate = validator()
    docs = render(KUBERNETES / overlay)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: not in Kubernetes' schemas (checked in the KEDA test below)
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names


def test_every_manifest_file_is_part_of_a_kustomization() -> None:
    listed = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        entries = yaml.safe_load(kustomization.read_text())["resources"]
        listed |= {(kustomization.parent / e).resolve() for e in entries}
    files = {p.resolve() for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files <= listed, files - listed


def test_workers_drain_on_a_rolling_update_and_probe_their_own_node() -> None:
    docs = render(KUBERNETES / "base")
    config = one(docs, "ConfigMap", "modelworkers")["data"]
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(config) <= settings, set(config) - settings
    worker = one(docs, "Deployment", "modelworkers-worker")
    pod = worker["spec"]["template"]["spec"]
    [container] = pod["containers"]
    time_limit = int(
        config.get(
            "MODELWORKERS_TASK_TIME_LIMIT_SECONDS",
            Settings.model_fields["task_time_limit_seconds"].default,
        )
    )
    # SIGTERM is Celery's warm shutdown: running tasks (at most the time limit) finish first
    assert pod["terminationGracePeriodSeconds"] > time_limit
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = env_of(container)
    assert env["NODE"] == "worker@$(POD_NAME)"
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert container["command"][-2:] == ["-n", "$(NODE)"]
    # gossip and mingle cost Redis traffic that grows with the square of the nodes
    assert {"--without-gossip", "--without-mingle"} <= set(container["command"])
    for probe in ("startupProbe", "readinessProbe"):
        command = probe_command(container, probe)
        assert 'modelworkers health --node "$NODE" --min-processes' in command
        assert "--live" not in command
    assert 'modelworkers health --live --node "$NODE"' in probe_command(container, "livenessProbe")
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # a cold start
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["enableServiceLinks"] is False
    pdb = one(docs, "PodDisruptionBudget", "modelworkers-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        worker["spec"]["template"]["metadata"]["labels"].items()
    )


def test_services_select_pods_and_secrets_are_the_documented_ones() -> None:
    docs = render(KUBERNETES / "base")
    pods = [d["spec"]["template"] for d in docs if d["kind"] == "Deployment"]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        [pod] = [p for p in pods if selector <= p["metadata"]["labels"].items()]
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    refs = set()
    for pod in pods:
        for container in pod["spec"]["containers"]:
            for value in env_of(container).values():
                if isinstance(value, dict) and "secretKeyRef" in value:
                    refs.add((value["secretKeyRef"]["name"], value["secretKeyRef"]["key"]))
    assert refs == {("modelworkers", "redis-password"), ("modelworkers", "flower-basic-auth")}
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert "kubectl create secret generic modelworkers" in operations
    for _, key in refs:
        assert f"--from-literal={key}=" in operations
    flower = one(docs, "Deployment", "modelworkers-flower")["spec"]["template"]["spec"]
    [container] = flower["containers"]
    assert "FLOWER_BASIC_AUTH" in env_of(container)
    assert not any("basic-auth" in word for word in container["command"])


def test_keda_scales_the_workers_on_the_task_queue() -> None:
    """KEDA's resources are CRDs, outside Kubernetes' schemas: checked field by field against
    KEDA's documented ScaledObject / TriggerAuthentication and the redis trigger."""
    docs = render(KUBERNETES / "keda")
    config = one(docs, "ConfigMap", "modelworkers")["data"]
    scaled = one(docs, "ScaledObject", "modelworkers-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "advanced",
        "fallback",
        "triggers",
    }
    one(docs, "Deployment", spec["scaleTargetRef"]["name"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values())  # KEDA's trigger metadata: strings
    assert meta["listName"] == config["MODELWORKERS_TASK_QUEUE"]
    assert int(meta["listLength"]) > 0 and int(meta["activationListLength"]) >= 0
    host, _, port = meta["address"].partition(":")
    redis_service = one(docs, "Service", host)
    assert int(port) in {p["port"] for p in redis_service["spec"]["ports"]}
    assert config["MODELWORKERS_REDIS_URL"] == f"redis://{meta['address']}/{meta['databaseIndex']}"
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "modelworkers", "key": "redis-password"}
    ]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    validator().validate(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "check"},
            "spec": {
                "scaleTargetRef": {"kind": "Deployment", "name": "x"},
                "maxReplicas": 2,
                "behavior": behavior,  # KEDA passes it to the HPA it makes: the HPA's schema
            },
        },
        KUBERNETES_VERSION,
        strict=True,
    )


def test_the_hpa_scales_the_workers_on_the_exported_queue_depth() -> None:
    docs = render(KUBERNETES / "hpa")
    config = one(docs, "ConfigMap", "modelworkers")["data"]
    hpa = one(docs, "HorizontalPodAutoscaler", "modelworkers-worker")
    one(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == "modelworkers_queue_depth"
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {
        "queue": config["MODELWORKERS_TASK_QUEUE"]
    }


# ---- docker-compose.yml -----------------------------------------------------------------------
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def args_of(build: Any) -> dict[str, str]:
    return dict(build.get("args") or {}) if isinstance(build, dict) else {}


def test_compose_runs_a_gpu_worker_on_queue_gpu_beside_the_cpu_workers() -> None:
    services = compose()["services"]
    cpu, gpu = services["worker"], services["worker-gpu"]
    # the CPU workers run by default and consume TASK_QUEUE, not gpu
    assert "profiles" not in cpu and "-Q" not in cpu["command"]
    assert args_of(cpu.get("build")).get("TORCH_VARIANT", "cpu") == "cpu"
    # the GPU worker: only with the gpu profile, a CUDA torch image, queue gpu, the device
    assert gpu["profiles"] == ["gpu"]
    assert args_of(gpu["build"])["TORCH_VARIANT"] == "cuda"
    assert any(v.startswith("TORCH_VARIANT=") for k, v in dockerfile() if k == "ARG")
    command = gpu["command"]
    assert command[command.index("-Q") + 1] == "gpu"
    assert gpu["image"] != cpu["image"]  # the CUDA image does not replace the CPU one
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert gpu["environment"]["MODELWORKERS_MODEL_DEVICE"] == "cuda"
    # one pool process per GPU; node names differ, so each node's health check finds itself
    concurrency = command[command.index("--concurrency") + 1]
    assert concurrency == gpu["environment"]["MODELWORKERS_WORKER_CONCURRENCY"] == "1"
    assert "gpu@" in " ".join(gpu["healthcheck"]["test"])
    assert "-n" in command and command[command.index("-n") + 1].startswith("gpu@")


def test_compose_offers_rabbitmq_as_broker_with_results_and_registry_on_redis() -> None:
    spec = compose()
    services = spec["services"]
    rabbit = services["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:")
    # queued tasks survive a broker restart: its data directory is a named volume
    [volume] = rabbit["volumes"]
    name, _, path = volume.partition(":")
    assert path == "/var/lib/rabbitmq" and name in spec["volumes"]
    assert "healthcheck" in rabbit
    # every process that sends, takes or watches tasks gets the same BROKER_URL, and REDIS_URL
    for service in ("worker", "worker-gpu", "flower", "cli"):
        env = services[service]["environment"]
        assert env["MODELWORKERS_BROKER_URL"] == "${MODELWORKERS_BROKER_URL:-}", service
        assert env["MODELWORKERS_REDIS_URL"].startswith("redis://redis:"), service
    assert {"broker_url", "redis_url"} <= set(Settings.model_fields)
    # the workers wait for RabbitMQ when its profile is on, and start without it otherwise
    for service in ("worker", "worker-gpu"):
        dependency = services[service]["depends_on"]["rabbitmq"]
        assert dependency == {"condition": "service_healthy", "required": False}
