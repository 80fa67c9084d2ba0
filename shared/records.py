"""What processes write to Redis and read back, typed: process snapshots, model status, reload
requests and replies, and the fleet summary built from the snapshots.

Redis holds these as JSON (``model_dump_json`` / ``model_validate_json``), so a web app in any
language reads the same keys (their shapes are in docs/operations.md). Reading ignores fields it
does not know, so that processes of two releases can share a fleet during an upgrade.

Every record also answers ``record["field"]`` (and ``record.get("field")``), as the plain dicts
these functions returned before did; attribute access is the typed way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    """Base of the records: JSON in Redis, unknown fields ignored, dict-style reads allowed."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


# ---- one process -------------------------------------------------------------------------
class VersionStatus(Record):
    """One loaded (or loading, failed, unloaded) version of a model in one serving process."""

    status: str  # LOADING | READY | FAILED | UNLOADED
    weight: int = 0  # its share of the model's requests (0: answers pinned requests only)
    loaded_at: float | None = None
    load_seconds: float | None = None
    memory_mb: float | None = None  # measured for this version alone (see memory_exact)
    error: str | None = None
    calls: int = 0
    failures: int = 0
    in_flight: int = 0
    last_used: float | None = None


class ModelStatus(Record):
    """One model in one serving process (its fields describe the version with the largest
    share of requests; ``versions`` has each loaded version)."""

    name: str
    family: str
    version: str
    status: str  # LOADING | READY | FAILED | UNLOADED
    required: bool = True
    lazy: bool = False
    fallback: str | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    error: str | None = None
    reload_error: str | None = None
    device: str = "cpu"
    queue: str = ""  # the queue its tasks are routed to ("": the default queue)
    memory_delta_mb: float | None = None

    calls: int = 0
    failures: int = 0
    latency_mean_ms: float | None = None
    latency_p95_ms: float | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, VersionStatus] = Field(default_factory=dict)
    unloaded: bool = False  # unloaded on purpose (`modelworkers unload`): `load` brings it back
    loads: int = 0  # loads of any of its versions in this process (start, lazy, reloads)
    evictions: int = 0  # unloads to stay within the memory budget


class ProcessSnapshot(Record):
    """A serving process's registry and health: ``PREFIX:proc:HOST:PID`` in Redis."""

    node: str
    host: str
    pid: int
    started_at: float
    heartbeat: float | None = None  # set when published
    ready: bool
    not_ready_reasons: list[str] = Field(default_factory=list)
    models: dict[str, ModelStatus] = Field(default_factory=dict)
    unlisted_artifacts: list[str] = Field(default_factory=list)
    manifest_problems: dict[str, str] = Field(default_factory=dict)
    stats: dict[str, dict[str, float]] = Field(default_factory=dict)
    memory_budget_mb: float | None = None  # MODEL_MEMORY_BUDGET_MB
    models_memory_mb: float = 0.0  # what the loaded versions measured, together
    memory_exact: bool = True  # each figure measured alone (false: loads overlapped)


# ---- the fleet ---------------------------------------------------------------------------
class ModelSummary(Record):
    """One model across the processes of a fleet (or a node)."""

    required: bool
    ready_in: int = 0
    failed_in: int = 0
    versions: dict[str, int] = Field(default_factory=dict)  # version -> processes serving it


class NotReadyProcess(Record):
    node: str | None
    pid: int | None
    reasons: list[str] = Field(default_factory=list)


class FleetSummary(Record):
    """Is every required model READY in enough processes; who is not ready."""

    ready: bool
    processes: int
    ready_processes: int
    models: dict[str, ModelSummary] = Field(default_factory=dict)
    not_ready: list[NotReadyProcess] = Field(default_factory=list)


# ---- control: reload, load, unload, split ------------------------------------------------
class Desired(Record):
    """What a model should serve across the fleet (or on one node): ``PREFIX:desired`` holds one
    per model. A single version with every request is written as the plain version string."""

    weights: dict[str, int] = Field(default_factory=dict)  # version -> share of requests
    unloaded: bool = False

    def encode(self) -> str:
        if not self.unloaded and len(self.weights) == 1:
            return next(iter(self.weights))
        return self.model_dump_json()

    @classmethod
    def decode(cls, raw: str) -> Desired:
        if raw.startswith("{"):
            return cls.model_validate_json(raw)
        return cls(weights={raw: 100})


class ReloadRequest(Record):
    """A control request published on ``PREFIX:control`` (models None: all; nodes None: every
    node). ``action``: reload (a version, or the default one, replaces the serving one), load
    (serve a model, also one added to the repository after start, or unloaded before), unload,
    split (serve several versions with ``weights``)."""

    id: str
    action: str = "reload"
    models: list[str] | None = None
    version: str | None = None
    weights: dict[str, int] | None = None
    nodes: list[str] | None = None

    sent_at: float = 0.0
    # (hash key, model, version to put back or None to remove): what the desired-version hashes
    # held before this request, so that a failed reload can restore them exactly
    previous_desired: list[tuple[str, str, str | None]] = Field(default_factory=list)


class SentReload(ReloadRequest):
    """A published request, with the processes expected to answer it."""

    expected: list[tuple[str | None, int]] = Field(default_factory=list)  # (node, pid)
    receivers: int = 0  # subscribers that got the message (processes, not nodes)


class ReloadResult(Record):
    """One model's reload in one process."""

    model: str | None
    old_version: str | None = None
    new_version: str | None = None
    ok: bool = False
    seconds: float | None = None
    error: str | None = None


class ProcessReply(Record):
    """A process's answer to a reload request: ``PREFIX:reload:ID`` holds one per process."""

    node: str
    host: str
    pid: int
    ok: bool
    results: list[ReloadResult] = Field(default_factory=list)


class MissingReply(Record):
    node: str | None
    pid: int
    error: str


class ReloadOutcome(Record):
    """What ``collect_replies`` saw: every reply, who did not answer, what was rolled back."""

    id: str
    ok: bool
    rolled_back: list[ReloadRequest] = Field(default_factory=list)
    replies: list[ProcessReply] = Field(default_factory=list)
    missing: list[MissingReply] = Field(default_factory=list)
