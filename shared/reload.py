"""The fleet's control plane: reload, load, unload and split, reaching every serving process on
every node, through Redis.

Celery's remote-control commands run in each worker's main process, which holds no models, and
a ``Broadcast`` queue reaches only one pool process per node. So requests travel on a Redis
pub/sub channel that every serving process listens to, and each process answers on a list::

    PREFIX:control          pub/sub channel; message: a ReloadRequest {"id", "action", "models",
                            "version", "weights", "nodes", "sent_at", "previous_desired"}
                            (models null = all; nodes null = all)
    PREFIX:reload:ID        list of replies, one per process: a ProcessReply {"node", "host",
                            "pid", "ok", "results": [ReloadResult {"model", "old_version",
                            "new_version", "ok", "seconds", "error"}]}; expires after an hour
    PREFIX:desired          hash model -> what every process should serve (a Desired: a plain
                            version, or JSON {"weights": {...}} / {"unloaded": true}). Processes
                            that start later (replacement children, new nodes) do the same, and
                            a process that missed a request catches up on its next heartbeat.
    PREFIX:desired:NODE     the same for one node; it takes precedence over the fleet-wide hash.
    PREFIX:desired-nodes    set of the nodes that have such a hash, so that a fleet-wide request
                            finds them without scanning the database.
    PREFIX:history:MODEL    list of the model's earlier desired values (newest first), for
                            ``rollback``.

Each process handles requests one at a time (queued, never interleaved) and loads a new version
beside the serving one before moving requests to it (``ModelRegistry.reload`` / ``split``). Only
names and versions listed in the model repository are accepted, never paths. No Celery here: the
CLI, the remote-control command and a web app can all send requests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from shared.errors import ModelNotFound, ReloadRefused
from shared.manifest import Manifest, ModelSpec
from shared.records import (
    Desired,
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
HISTORY = 20  # earlier desired values kept per model for rollback
ACTIONS = ("reload", "load", "unload", "split")


def channel(prefix: str) -> str:
    return f"{prefix}:control"


def reply_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:reload:{request_id}"


def desired_key(prefix: str, node: str | None = None) -> str:
    """Fleet-wide desired states, or one node's (which take precedence for that node)."""
    return f"{prefix}:desired" if node is None else f"{prefix}:desired:{node}"


def desired_nodes_key(prefix: str) -> str:
    return f"{prefix}:desired-nodes"


def history_key(prefix: str, model: str) -> str:
    return f"{prefix}:history:{model}"


def read_desired(client: Any, prefix: str, node: str | None) -> dict[str, Desired]:
    """What this node should serve: the fleet-wide states, overlaid with the node's own."""
    keys = [desired_key(prefix)] + ([desired_key(prefix, node)] if node else [])
    merged: dict[str, Desired] = {}
    for key in keys:
        for name, raw in client.hgetall(key).items():
            try:
                merged[name.decode()] = Desired.decode(raw.decode())
            except ValueError:
                continue  # written by something else: ignored
    return merged


def new_request(
    models: list[str] | None,
    version: str | None,
    nodes: list[str] | None,
    *,
    action: str = "reload",
    weights: dict[str, int] | None = None,
) -> ReloadRequest:
    """A control request with a fresh id, stamped now."""
    return ReloadRequest(
        id=uuid.uuid4().hex,
        action=action,
        models=models,
        version=version,
        weights=weights,
        nodes=nodes,
        sent_at=time.time(),
    )


def validate_request(
    manifest: Manifest,
    models: list[str] | None,
    version: str | None,
    *,
    action: str = "reload",
    weights: dict[str, int] | None = None,
) -> list[str]:
    """The model names a request covers; refuses unknown names, unknown versions, paths and
    splits that do not add up."""
    if action not in ACTIONS:
        raise ReloadRefused(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    if version is not None and (not models or len(models) != 1):
        raise ReloadRefused("a version can only be given when reloading one model by name")
    if action != "reload" and (not models or len(models) != 1):
        raise ReloadRefused(f"{action} takes exactly one model by name")
    names = models or [s.name for s in manifest.active()]
    for name in names:
        if "/" in name or "\\" in name or name.startswith("."):
            raise ReloadRefused(f"reload takes model names from the manifest, not paths: {name!r}")
        if name not in manifest.names:
            raise ReloadRefused(str(ModelNotFound(name, manifest.names)))
        listed = {s.version for s in manifest.versions(name)}
        for wanted in [version] if version is not None else list(weights or {}):
            if wanted not in listed:
                raise ReloadRefused(
                    f"model {name!r} has no version {wanted!r} in the manifest "
                    f"(listed: {', '.join(s.version for s in manifest.versions(name))})"
                )
    if action == "split":
        if not weights or any(type(w) is not int or w < 0 for w in weights.values()):
            raise ReloadRefused("a split gives each version a whole, non-negative weight")
        if sum(weights.values()) <= 0:
            raise ReloadRefused("a split needs a weight above 0")
    return names


def desired_after(manifest: Manifest, request: ReloadRequest, name: str) -> Desired:
    """The state ``request`` asks ``name`` to serve."""
    if request.action == "unload":
        return Desired(unloaded=True)
    if request.action == "split":
        return Desired(weights=dict(request.weights or {}))
    return Desired(weights={manifest.get(name, request.version).version: 100})


def handle_request(
    registry: ModelRegistry,
    read_manifest: Callable[[], Manifest],
    request: ReloadRequest,
    *,
    serves: Callable[[ModelSpec], bool] = lambda spec: True,
    unload_timeout: float = 60.0,
) -> list[ReloadResult]:
    """Carry out one request in this process (only for the models this process ``serves``):
    re-read the repository, then reload, load, unload or split each model it names."""
    manifest = read_manifest()
    try:
        names = validate_request(
            manifest,
            request.models,
            request.version,
            action=request.action,
            weights=request.weights,
        )
    except ReloadRefused as exc:
        return [ReloadResult(model=None, error=f"ReloadRefused: {exc}")]
    known = set(registry.names())
    results = []
    for name in names:
        spec = manifest.get(name, request.version)
        if not serves(spec):
            continue  # routed to a queue this node does not consume
        if request.action == "load":
            results.append(registry.load(spec))
        elif name not in known:
            continue
        elif request.action == "unload":
            results.append(registry.unload(name, unload_timeout))
        elif request.action == "split":
            weights = dict(request.weights or {})
            specs = {v: manifest.get(name, v) for v in weights}
            results.append(registry.split(name, specs, weights))
        elif registry.weights(name):  # reload: an unloaded model stays unloaded
            results.append(registry.reload(spec))
    return results


def converge(
    registry: ModelRegistry,
    read_manifest: Callable[[], Manifest],
    desired: Mapping[str, Desired | str],
    attempted: set[tuple[str, str]],
    *,
    serves: Callable[[ModelSpec], bool] = lambda spec: True,
) -> list[ReloadResult]:
    """Bring every model to its desired state (each (name, state) tried once per process, so
    a broken version is not retried forever): unload, reload, split, or load a model this
    process does not have yet."""
    todo = []
    for name, raw in desired.items():
        want = Desired.decode(raw) if isinstance(raw, str) else raw
        state = want.encode()

        if (name, state) in attempted:
            continue
        if name not in registry.names():
            if not want.unloaded:
                todo.append((name, want))
            continue
        meta = registry.metadata(name)
        current = registry.weights(name)
        if want.unloaded:
            if current:
                todo.append((name, want))
        elif want.weights != current and (
            meta.status in (ModelState.READY, ModelState.FAILED) or not current
        ):
            todo.append((name, want))
    if not todo:
        return []
    manifest = read_manifest()
    results = []
    for name, want in todo:
        attempted.add((name, want.encode()))
        try:
            if want.unloaded:
                results.append(registry.unload(name, 0.0))
                continue
            specs = {v: manifest.get(name, v) for v in want.weights}
            if not serves(next(iter(specs.values()))):
                continue
            if name not in registry.names():
                results.append(registry.load(next(iter(specs.values()))))
                if len(specs) == 1:
                    continue
            if len(specs) == 1:
                results.append(registry.reload(next(iter(specs.values()))))
            else:
                results.append(registry.split(name, specs, want.weights))
        except ModelNotFound as exc:
            results.append(ReloadResult(model=name, new_version=want.encode(), error=str(exc)))
    return results


def send_request(
    client: Any,
    prefix: str,
    manifest: Manifest,
    *,
    action: str = "reload",
    models: list[str] | None = None,
    version: str | None = None,
    weights: dict[str, int] | None = None,
    nodes: list[str] | None = None,
    set_desired: bool = True,
    record_history: bool = True,
) -> SentReload:
    """Validate and publish a control request; returns it with the processes expected to answer.

    ``set_desired`` records the states it asks for (fleet-wide, or per destination node) so that
    processes started later serve them too, and keeps the earlier ones in each model's history
    (for ``rollback``). The request carries what the desired hashes held before: a process whose
    request fails puts it back, and ``collect_replies`` does too.
    """
    names = validate_request(manifest, models, version, action=action, weights=weights)
    live = read_snapshots(client, prefix)
    expected = [(s.node, s.pid) for s in live if not nodes or s.node in nodes]
    request = new_request(names, version, nodes, action=action, weights=weights)
    previous = request.previous_desired  # (hash key, model, the value it held or None)

    def remember_and_set(key: str, name: str, value: str | None) -> None:
        old = client.hget(key, name)
        previous.append((key, name, old.decode() if old else None))
        if value is None:
            client.hdel(key, name)
        else:
            client.hset(key, name, value)

    if set_desired:
        for name in names:
            target = desired_after(manifest, request, name).encode()
            if nodes:
                client.sadd(desired_nodes_key(prefix), *nodes)
                for node in nodes:
                    remember_and_set(desired_key(prefix, node), name, target)
            else:
                before = client.hget(desired_key(prefix), name)
                # A fleet-wide state supersedes what earlier per-node requests pinned: the nodes
                # listed in PREFIX:desired-nodes, and the live ones (whose hash an earlier
                # version may have written without listing it).
                pinned = {n.decode() for n in client.smembers(desired_nodes_key(prefix))}
                for node in sorted(pinned | {s.node for s in live if s.node}):
                    if client.hexists(desired_key(prefix, node), name):
                        remember_and_set(desired_key(prefix, node), name, None)
                remember_and_set(desired_key(prefix), name, target)
                if record_history and (before.decode() if before else None) != target:
                    client.lpush(history_key(prefix, name), before.decode() if before else "")
                    client.ltrim(history_key(prefix, name), 0, HISTORY - 1)
    # The processes restore the previous desired states themselves if their request fails, so a
    # failed request sent without waiting (or as a Celery broadcast) is not left pinned.
    receivers = client.publish(channel(prefix), request.model_dump_json())
    return SentReload(**request.model_dump(), expected=expected, receivers=receivers)


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
    """``send_request`` of a reload (kept under its earlier name)."""
    return send_request(
        client,
        prefix,
        manifest,
        action="reload",
        models=models,
        version=version,
        nodes=nodes,
        set_desired=set_desired,
    )


def send_rollback(client: Any, prefix: str, manifest: Manifest, model: str) -> SentReload:
    """Undo the last fleet-wide change of ``model``: publish the state it had before (a version,
    a split, unloaded; nothing recorded: its default version)."""
    raw = client.lpop(history_key(prefix, model))
    if raw is None:
        raise ReloadRefused(f"nothing to roll back for {model!r}: no earlier state is recorded")
    previous = raw.decode()
    if previous:
        state = Desired.decode(previous)
    else:  # the model had no recorded state: back to what its model file says
        state = Desired(weights={manifest.get(model).version: 100})
    # The rollback itself is not a state to go back to: no history is recorded for it.
    if state.unloaded:
        return send_request(
            client, prefix, manifest, action="unload", models=[model], record_history=False
        )
    if len(state.weights) == 1:
        return send_request(
            client,
            prefix,
            manifest,
            action="load",
            models=[model],
            version=next(iter(state.weights)),
            record_history=False,
        )
    return send_request(
        client,
        prefix,
        manifest,
        action="split",
        models=[model],
        weights=state.weights,
        record_history=False,
    )


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
    got: set[tuple[str, int]] = set()
    while True:
        # only the replies not read yet: each is fetched and parsed once, however many polls
        new = [ProcessReply.model_validate_json(r) for r in client.lrange(key, len(replies), -1)]
        replies += new
        got.update((r.node, r.pid) for r in new)
        if progress:
            progress(len(got & expected), len(expected))
        if expected <= got or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    missing = sorted(expected - {(r.node, r.pid) for r in replies}, key=str)
    ok = bool(replies) and not missing and all(r.ok for r in replies)
    rolled_back: list[ReloadRequest] = []
    if not ok:
        # Not every process took the new state: later processes must not take it either, and
        # the processes that did switch go back (a reload or load sends them their previous
        # version; after a split or unload the heartbeat brings them back to the desired state).
        restore_desired(client, request)
        if request.action in ("reload", "load"):
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
