"""Fleet-wide reload: reaching every pool process, on every node, through Redis.

Celery's remote-control commands run in each worker's main process, which holds no models, and
a ``Broadcast`` queue reaches only one pool process per node. So a reload travels on a Redis
pub/sub channel that every serving process listens to, and each process answers on a list::

    PREFIX:control          pub/sub channel; message: a ReloadRequest {"id", "action":
                            "reload", "models", "version", "nodes", "sent_at",
                            "previous_desired"} (models null = all; nodes null = all)
    PREFIX:reload:ID        list of replies, one per process: a ProcessReply {"node", "host",
                            "pid", "ok", "results": [ReloadResult {"model", "old_version",
                            "new_version", "ok", "seconds", "error"}]}; expires after an hour
    PREFIX:desired          hash model -> version: what every process should serve. Processes
                            that start later (replacement children, new nodes) load it, and a
                            process that missed a message catches up on its next heartbeat.
    PREFIX:desired:NODE     the same for one node (a reload sent with destinations); it takes
                            precedence over the fleet-wide hash on that node.

Each process handles requests one at a time (queued, never interleaved) and loads the new
version beside the old one before swapping (``ModelRegistry.reload``). Only names and versions
listed in the manifest are accepted, never paths. No Celery here: the CLI, the remote-control
command and a web app can all send reloads.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from shared.errors import ModelNotFound, ReloadRefused
from shared.manifest import Manifest
from shared.records import (
    MissingReply,
    ProcessReply,
    ReloadOutcome,
    ReloadRequest,
    ReloadResult,
    SentReload,
)
from shared.registry import ModelRegistry, ModelState
from shared.state import read_snapshots

REPLY_TTL = 3600


def channel(prefix: str) -> str:
    return f"{prefix}:control"


def reply_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:reload:{request_id}"


def desired_key(prefix: str, node: str | None = None) -> str:
    """Fleet-wide desired versions, or one node's (which take precedence for that node)."""
    return f"{prefix}:desired" if node is None else f"{prefix}:desired:{node}"


def read_desired(client: Any, prefix: str, node: str | None) -> dict[str, str]:
    """The versions this node should serve: fleet-wide, overlaid with the node's own."""
    keys = [desired_key(prefix)] + ([desired_key(prefix, node)] if node else [])
    merged: dict[str, str] = {}
    for key in keys:
        merged.update({k.decode(): v.decode() for k, v in client.hgetall(key).items()})
    return merged


def new_request(
    models: list[str] | None, version: str | None, nodes: list[str] | None
) -> ReloadRequest:
    """A reload request with a fresh id, stamped now."""
    return ReloadRequest(
        id=uuid.uuid4().hex, models=models, version=version, nodes=nodes, sent_at=time.time()
    )


def validate_request(
    manifest: Manifest, models: list[str] | None, version: str | None
) -> list[str]:
    """The model names a reload covers; refuses unknown names, unknown versions and paths."""
    if version is not None and (not models or len(models) != 1):
        raise ReloadRefused("a version can only be given when reloading one model by name")
    names = models or [s.name for s in manifest.active()]
    for name in names:
        if "/" in name or "\\" in name or name.startswith("."):
            raise ReloadRefused(f"reload takes model names from the manifest, not paths: {name!r}")
        if name not in manifest.names:
            raise ReloadRefused(str(ModelNotFound(name, manifest.names)))
        if version is not None and version not in {s.version for s in manifest.versions(name)}:
            listed = ", ".join(s.version for s in manifest.versions(name))
            raise ReloadRefused(
                f"model {name!r} has no version {version!r} in the manifest (listed: {listed})"
            )
    return names


def handle_request(
    registry: ModelRegistry, read_manifest: Callable[[], Manifest], request: ReloadRequest
) -> list[ReloadResult]:
    """Run one reload request in this process: re-read the manifest, reload each model."""
    manifest = read_manifest()
    try:
        names = validate_request(manifest, request.models, request.version)
    except ReloadRefused as exc:
        return [ReloadResult(model=None, error=f"ReloadRefused: {exc}")]
    served = set(registry.names())  # a model routed to another queue is not served here
    return [
        registry.reload(manifest.get(name, request.version)) for name in names if name in served
    ]


def converge(
    registry: ModelRegistry,
    read_manifest: Callable[[], Manifest],
    desired: dict[str, str],
    attempted: set[tuple[str, str]],
) -> list[ReloadResult]:
    """Reload any model whose serving version differs from the fleet's desired one (each
    (name, version) tried once per process, so a broken version is not retried forever)."""
    todo = []
    for name, version in desired.items():
        if name not in registry.names() or (name, version) in attempted:
            continue
        meta = registry.metadata(name)
        if meta.version != version and meta.status in (ModelState.READY, ModelState.FAILED):
            todo.append((name, version))
    if not todo:
        return []
    manifest = read_manifest()
    results = []
    for name, version in todo:
        attempted.add((name, version))
        try:
            results.append(registry.reload(manifest.get(name, version)))
        except ModelNotFound as exc:
            results.append(ReloadResult(model=name, new_version=version, error=str(exc)))
    return results


def send_reload(
    client: Any,
    prefix: str,
    manifest: Manifest,
    *,
    models: list[str] | None = None,
    version: str | None = None,
    nodes: list[str] | None = None,
    set_desired: bool = True,
) -> SentReload:
    """Validate and publish a reload; returns the request with the processes expected to answer.

    ``set_desired`` records the target versions (fleet-wide, or per destination node) so that
    processes started later load them too. The request carries what those hashes held before:
    a process whose reload fails puts it back, and ``collect_replies`` does too and rolls back
    the processes that did switch.
    """
    names = validate_request(manifest, models, version)
    live = read_snapshots(client, prefix)
    expected = [(s.node, s.pid) for s in live if not nodes or s.node in nodes]
    request = new_request(names, version, nodes)
    previous = request.previous_desired  # (hash key, model, the version it held or None)

    def remember_and_set(key: str, name: str, value: str | None) -> None:
        old = client.hget(key, name)
        previous.append((key, name, old.decode() if old else None))
        if value is None:
            client.hdel(key, name)
        else:
            client.hset(key, name, value)

    if set_desired:
        for name in names:
            target = manifest.get(name, version).version
            if nodes:
                for node in nodes:
                    remember_and_set(desired_key(prefix, node), name, target)
            else:
                # A fleet-wide version supersedes what earlier per-node reloads pinned.
                for key in client.scan_iter(match=f"{desired_key(prefix)}:*"):
                    remember_and_set(key.decode() if isinstance(key, bytes) else key, name, None)
                remember_and_set(desired_key(prefix), name, target)
    # The processes restore the previous desired versions themselves if their reload fails, so a
    # failed reload sent without waiting (or as a Celery broadcast) is not left pinned.
    receivers = client.publish(channel(prefix), request.model_dump_json())
    return SentReload(**request.model_dump(), expected=expected, receivers=receivers)


def collect_replies(
    client: Any,
    prefix: str,
    request: SentReload,
    *,
    timeout: float,
    progress: Callable[[int, int], None] | None = None,
) -> ReloadOutcome:
    """Wait (bounded) for a reply from every expected process; report who did not answer."""
    key = reply_key(prefix, request.id)
    expected = set(request.expected)
    deadline = time.monotonic() + timeout
    replies: list[ProcessReply] = []
    while True:
        replies = [ProcessReply.model_validate_json(r) for r in client.lrange(key, 0, -1)]
        got = {(r.node, r.pid) for r in replies}
        if progress:
            progress(len(got & expected), len(expected))
        if expected <= got or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    missing = sorted(expected - {(r.node, r.pid) for r in replies}, key=str)
    ok = bool(replies) and not missing and all(r.ok for r in replies)
    rolled_back: list[ReloadRequest] = []
    if not ok:
        # Not every process took the new version: later processes must not load it, and the
        # processes that did switch go back, so that the fleet serves one version.
        restore_desired(client, request)
        rolled_back = roll_back(client, prefix, replies)
    return ReloadOutcome(
        id=request.id,
        ok=ok,
        rolled_back=rolled_back,
        replies=replies,
        missing=[
            MissingReply(node=n, pid=p, error=f"no answer within {timeout:g} s") for n, p in missing
        ],
    )


def roll_back(client: Any, prefix: str, replies: list[ProcessReply]) -> list[ReloadRequest]:
    """Send the processes' nodes that switched a model back to the version they had before
    (a reload is all or nothing); returns the rollback requests sent (not waited for)."""
    back: dict[tuple[str, str], set[str]] = {}
    for reply in replies:
        for result in reply.results:
            if result.ok and result.old_version and result.model:
                back.setdefault((result.model, result.old_version), set()).add(reply.node)
    sent = []
    for (name, version), nodes in sorted(back.items()):
        request = new_request([name], version, sorted(nodes))
        client.publish(channel(prefix), request.model_dump_json())
        sent.append(request)
    return sent


def restore_desired(client: Any, request: ReloadRequest) -> None:
    """Put back exactly the desired versions (or their absence) that a failed reload replaced."""
    for key, name, old in request.previous_desired:
        if old is None:
            client.hdel(key, name)
        else:
            client.hset(key, name, old)
