"""The two threads of a serving process that talk to Redis: the heartbeat and the control
listener. Both are started and stopped by :class:`workers.serving.ServingProcess`."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from shared import heap
from shared.manifest import Manifest, ModelSpec
from shared.records import ProcessReply, ReloadRequest, ReloadResult
from shared.registry import ModelRegistry
from shared.reload import (
    REPLY_TTL,
    channel,
    converge,
    desired_after,
    handle_request,
    read_desired,
    reply_key,
    restore_desired,
)
from shared.settings import Settings
from shared.state import publish_snapshot, remove_snapshot
from shared.urls import redact, redis_client

log = logging.getLogger("modelworkers.worker")
# Every this many beats a process also drops long-expired entries from the snapshot index (each
# process's first beat does too): a third command on one beat in ten, not on every one.
PRUNE_EVERY = 10


def log_reload(result: ReloadResult, action: str = "reload") -> None:
    """One line per model and process for a reload, load, unload or split."""
    if result.ok:
        done = {"reload": "reloaded", "load": "loaded", "unload": "unloaded", "split": "split"}
        log.info(
            "%s %s: %s -> %s in %.2f s [pid %d]",
            done.get(action, action),
            result.model,
            result.old_version,
            result.new_version or "(not serving)",
            result.seconds or 0,
            os.getpid(),
        )
    else:
        log.error(
            "%s of %s to %s failed, %s keeps serving: %s [pid %d]",
            action,
            result.model,
            result.new_version,
            result.old_version,
            result.error,
            os.getpid(),
        )


class Heartbeat(threading.Thread):
    """Every HEARTBEAT_SECONDS: republish this process's snapshot, and converge on the fleet's
    desired model versions (catching up on a reload this process missed); between tasks, hand
    the heap memory they freed back to the system (TRIM_IDLE_MEMORY, ``shared.heap``). Survives
    Redis restarts: a failed beat is logged once and retried."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        read_manifest: Callable[[], Manifest],
        attempted: set[tuple[str, str]],
        *,
        serves: Callable[[ModelSpec], bool] = lambda spec: True,
    ) -> None:
        super().__init__(name="registry-heartbeat", daemon=True)
        self.settings, self.registry, self.read_manifest = settings, registry, read_manifest
        self.serves = serves
        self.client = redis_client(settings)
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.reload_lock = threading.Lock()  # shared with the listener: reloads never interleave
        self.attempted = set(attempted)  # (model, version) already tried here: not retried
        self._failing = False
        self.beats = 0

    def converge(self) -> None:
        desired = read_desired(self.client, self.settings.key_prefix, self.registry.node)
        if not desired or not self.reload_lock.acquire(blocking=False):
            return  # nothing desired, or a reload is running: never block the heartbeat
        try:
            for result in converge(
                self.registry, self.read_manifest, desired, self.attempted, serves=self.serves
            ):
                log_reload(result)
        finally:
            self.reload_lock.release()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.converge()
                if self.stopping.is_set():
                    break  # shutting down: stop() deletes the key, never publish it again
                publish_snapshot(
                    self.client,
                    self.settings.key_prefix,
                    self.registry.snapshot(),
                    self.settings.state_ttl_seconds,
                    prune=self.beats % PRUNE_EVERY == 0,
                )
                self.beats += 1
                if self._failing:
                    log.info("registry heartbeat to Redis resumed")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning("registry heartbeat failed (will retry): %s", redact(str(exc)))
                self._failing = True
            if self.settings.trim_idle_memory:
                heap.trim_if_idle()  # gone quiet: what its tasks freed goes back to the system
            self.wake.wait(self.settings.heartbeat_seconds)
            self.wake.clear()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop beating and remove this process's key. A beat in progress is waited for
        (bounded): a process that shuts down right after it started (memory recycling: one task)
        would otherwise see its first beat publish the key again after the delete."""
        self.stopping.set()
        self.wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        with suppress(Exception):
            host = self.registry.snapshot().host
            remove_snapshot(self.client, self.settings.key_prefix, host, os.getpid())


class ControlListener(threading.Thread):
    """Acts on reload requests from the PREFIX:control channel, one at a time, and replies."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        heartbeat: Heartbeat,
        read_manifest: Callable[[], Manifest],
        *,
        serves: Callable[[ModelSpec], bool] = lambda spec: True,
    ) -> None:
        super().__init__(name="control-listener", daemon=True)
        self.settings, self.registry, self.heartbeat = settings, registry, heartbeat
        self.read_manifest, self.serves = read_manifest, serves
        self.stopping = threading.Event()
        self.subscribed = threading.Event()

    def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                client = redis_client(self.settings, socket_timeout=None)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel(self.settings.key_prefix))
                self.subscribed.set()
                backoff = 0.5
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self.on_message(client, message["data"])
            except Exception as exc:
                self.subscribed.clear()
                if not self.stopping.is_set():
                    log.warning(
                        "control channel lost (%s); resubscribing in %.1f s",
                        redact(str(exc)),
                        backoff,
                    )
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 10.0)

    def on_message(self, client: Any, data: bytes) -> None:
        try:
            request = ReloadRequest.model_validate_json(data)
        except ValueError as exc:
            log.warning("ignored a control message that is not a reload request: %s", exc)
            return
        self.handle(client, request)

    def handle(self, client: Any, request: ReloadRequest) -> None:
        if request.nodes and self.registry.node not in request.nodes:
            return
        with self.heartbeat.reload_lock:
            results = handle_request(
                self.registry,
                self.read_manifest,
                request,
                serves=self.serves,
                unload_timeout=float(self.settings.task_time_limit_seconds),
            )
        manifest = self.read_manifest()
        for result in results:
            log_reload(result, request.action)
            if result.model and (request.version or request.action != "reload"):
                with suppress(Exception):  # the heartbeat does not try this state again
                    state = desired_after(manifest, request, result.model).encode()
                    self.heartbeat.attempted.add((result.model, state))

        snap = self.registry.snapshot()
        reply = ProcessReply(
            node=snap.node,
            host=snap.host,
            pid=snap.pid,
            ok=all(r.ok for r in results),
            results=results,
        )
        if not reply.ok:
            restore_desired(client, request)
        key = reply_key(self.settings.key_prefix, request.id)
        client.rpush(key, reply.model_dump_json())
        client.expire(key, REPLY_TTL)
        self.heartbeat.wake.set()  # publish the new state now
