"""A real ``redis-server`` run the way docker-compose.yml runs it (AOF, ``appendfsync everysec``),
in a folder of the caller's, restartable on the same data and port. The persistence flags are
read from the compose file, so the tests exercise what is deployed."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import suppress
from pathlib import Path

import redis
import yaml

from harness import ROOT, wait_for
from workers.embedded import free_port, redis_server_binary

COMPOSE = ROOT / "docker-compose.yml"
# Flags of the compose service that only make sense in its container.
CONTAINER_ONLY = ("--dir", "--aclfile")


def compose_redis_flags(compose: Path = COMPOSE) -> list[str]:
    """The redis-server arguments of the compose file's ``redis`` service (those after its start
    script), without the container's paths (``--dir``)."""
    command = yaml.safe_load(compose.read_text())["services"]["redis"]["command"]
    script = next(i for i, arg in enumerate(command) if arg.endswith(".sh"))
    args = command[script + 1 :]
    flags: list[str] = []
    for name, value in zip(args[::2], args[1::2], strict=True):
        if name not in CONTAINER_ONLY:
            flags += [name, value]
    return flags


class DurableRedis:
    """``redis-server`` with the compose file's persistence flags in ``folder``."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.flags = compose_redis_flags()
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("redis-server") or redis_server_binary()

    def start(self, timeout: float = 30.0) -> DurableRedis:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += [*self.flags, "--dir", str(self.folder)]
        with (self.folder / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = redis.Redis.from_url(self.url, socket_timeout=1)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.folder / "redis.log").read_text()
                raise RuntimeError(f"redis-server exited: {log[-2000:]}")
            with suppress(redis.RedisError):
                return bool(client.ping()) and client.info("persistence")["loading"] == 0
            return False

        try:
            wait_for(up, timeout, "redis-server to accept connections and load its AOF", 0.05)
        finally:
            client.close()
        return self

    def stop(self) -> None:
        """SIGTERM: Redis writes what its AOF still buffers and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> DurableRedis:
        self.stop()
        return self.start()

    def __enter__(self) -> DurableRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
