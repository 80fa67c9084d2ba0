"""Signed messages (MESSAGE_SIGNING) with a real worker: what is not signed by a trusted
certificate never runs, and fails with InvalidMessage; what is, is answered."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import ROOT, WorkerProcess, build_kmeans, close_app, write_manifest
from harness.signing import cert_store, make_identity, sign_body
from shared.errors import InvalidMessage
from shared.settings import Settings
from tests.reliability.hostile import NO_OPTIONS, envelope, push, task_headers
from workers.client import ModelClient

pytestmark = pytest.mark.integration
pytest.importorskip("cryptography", reason="signing needs the cryptography package")
Start = Callable[..., WorkerProcess]
ROWS = [[0.0, 1.0, 2.0]]
ASSIGN = [[ROWS], {"model": "seg"}, NO_OPTIONS]  # clustering.assign's body: [args, kwargs, embed]


def run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_unsigned_and_wrongly_signed_tasks_never_run_and_signed_ones_are_answered(
    start_worker: Start, tmp_path: Path
) -> None:
    worker_id = make_identity(tmp_path / "keys", "worker")
    client_id = make_identity(tmp_path / "keys", "client")
    mallory = make_identity(tmp_path / "elsewhere", "mallory")  # a key nobody trusts
    store = cert_store(tmp_path / "trusted", worker_id, client_id)
    build_kmeans(tmp_path / "seg.joblib")
    manifest = write_manifest(
        tmp_path, [{"name": "seg", "family": "sklearn", "path": "seg.joblib"}]
    )
    worker = start_worker(
        concurrency=1, env={"MODELWORKERS_MODEL_MANIFEST": str(manifest), **worker_id.env(store)}
    )
    worker.wait_ready(1)
    signed = Settings(
        redis_url=worker.redis_url,
        task_queue=worker.queue,
        key_prefix=worker.prefix,
        message_signing=True,
        signing_key=client_id.key,
        signing_cert=client_id.cert,
        signing_cert_store=store,
    )

    def raw(body: bytes, content_type: str = "application/data") -> str:
        task_id = str(uuid.uuid4())
        headers = task_headers("clustering.assign", task_id)
        push(
            worker.client,
            worker.queue,
            envelope(body, headers, worker.queue, content_type=content_type),
        )
        return task_id

    plain = worker.app()  # a plain JSON client: nothing signed
    try:
        unsigned = plain.send_task("clustering.assign", args=[ROWS], kwargs={"model": "seg"}).id
    finally:
        close_app(plain)
    good = sign_body(client_id, ASSIGN)
    tampered = base64.b64encode(base64.b64decode(good).replace(b"2.0", b"7.0"))
    assert tampered != good
    refused = {
        unsigned: "not signed",
        raw(sign_body(mallory, ASSIGN)): "bad signature: signed by a certificate that is not",
        raw(sign_body(mallory, ASSIGN, as_signer=client_id)): "the signature does not match",
        raw(tampered): "the signature does not match",  # the body changed after signing
    }
    with ModelClient(settings=signed, timeout=30) as client:
        assert client.assign(ROWS, model="seg").labels  # the typed client signs
        answered = raw(good)  # the same body as the tampered one, as signed
        assert client.result(answered)["labels"]
        for task_id, problem in refused.items():
            with pytest.raises(InvalidMessage, match=problem):
                client.result(task_id)

    # The project's Celery app signs too, tasks and remote control; unsigned control is ignored.
    as_client = {**worker.env, **client_id.env(store)}
    code = (
        "import json; from workers.app import app; "
        "r = app.send_task('clustering.assign', args=[[[0.0, 1.0, 2.0]]], "
        "kwargs={'model': 'seg'}); "
        "print(json.dumps(r.get(timeout=30)))"
    )
    sent = run(as_client, "-c", code)
    assert sent.returncode == 0 and json.loads(sent.stdout)["labels"], sent.stderr[-2000:]
    inspect = ["-m", "celery", "-A", "workers.app", "inspect", "ping", "-d", worker.node]
    ping = run(as_client, *inspect, "-t", "10")
    assert f"{worker.node}: OK" in ping.stdout, ping.stdout + ping.stderr
    unsigned_env = {k: v for k, v in worker.env.items() if "SIGNING" not in k}
    silent = run(unsigned_env, *inspect, "-t", "3")
    assert silent.returncode != 0 and "OK" not in silent.stdout

    assert worker.alive()
    log = worker.log()
    for task_id in refused:
        assert f"{task_id}] received" not in log and f"{task_id}] succeeded" not in log
        assert f"refused clustering.assign[{task_id}] by the consumer: InvalidMessage" in log
    assert f"{answered}] received" in log and f"{answered}] succeeded" in log
    assert "Refusing to deserialize untrusted content of type json" in log  # the unsigned ping
