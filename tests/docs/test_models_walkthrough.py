"""docs/models.md's walk-through, run as written: its files, commands and Python, in a folder
outside the project, against a Redis of its own and a real worker.

Blocks are marked in the document with ``<!-- walkthrough: KIND [ARG] -->`` before a fenced code
block: ``file PATH`` writes the block to PATH; ``run`` runs it with bash (environment variables it
exports carry over to later blocks); ``start`` runs it in the background (the worker, stopped by
its process group at the end); ``python`` runs it, and the ``output`` block after it is what it
must print.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import pytest

from harness import ROOT, wait_for
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration
DOC = ROOT / "docs" / "models.md"
MARKED = re.compile(r"<!-- walkthrough: (\w+)\s*(\S*) -->\n```\w*\n(.*?)```", re.S)


def steps() -> list[tuple[str, str, str]]:
    return [(kind, arg, body) for kind, arg, body in MARKED.findall(DOC.read_text())]


def test_the_walkthrough_has_every_kind_of_step() -> None:
    kinds = [kind for kind, _, _ in steps()]
    assert kinds.count("file") >= 3 and kinds.count("run") >= 3
    assert kinds.count("start") == 1 and kinds.count("python") == kinds.count("output") == 2


def test_the_walkthrough_runs_as_written(tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("my-project")  # outside the project tree
    assert ROOT not in work.parents
    state = work / ".walkthrough-env.sh"
    with EmbeddedRedis() as redis:
        bin_dir = Path(sys.executable).parent
        env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", str(work)),
            "MODELWORKERS_REDIS_URL": redis.url,
            "MODELWORKERS_HEARTBEAT_SECONDS": "0.5",
        }
        state.write_text("".join(f"export {k}={v!r}\n" for k, v in env.items()))

        def bash(script: str, **kw: object) -> subprocess.CompletedProcess[str]:
            wrapped = f"set -e\nsource {state}\n{script}\nexport -p > {state}.next\n"
            done = subprocess.run(
                ["bash", "-c", wrapped], cwd=work, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"
            Path(f"{state}.next").replace(state)
            return done

        worker: subprocess.Popen[bytes] | None = None
        printed = None
        try:
            for kind, arg, body in steps():
                if kind == "file":
                    (work / arg).parent.mkdir(parents=True, exist_ok=True)
                    (work / arg).write_text(body)
                elif kind == "run":
                    bash(body)
                elif kind == "start":
                    log = (work / "worker.log").open("wb")
                    worker = subprocess.Popen(
                        ["bash", "-c", f"source {state}\nexec {body.strip()}"],
                        cwd=work,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )

                    def ready(process: subprocess.Popen[bytes] = worker) -> bool:
                        log_text = (work / "worker.log").read_text()
                        assert process.poll() is None, log_text[-3000:]
                        check = subprocess.run(
                            [
                                "bash",
                                "-c",
                                f"source {state}\nmodelworkers health --min-processes 2",
                            ],
                            cwd=work,
                            capture_output=True,
                        )
                        return check.returncode == 0

                    wait_for(ready, 180, "the walk-through's worker", 0.5)
                elif kind == "python":
                    (work / "step.py").write_text(body)
                    printed = bash("python step.py").stdout
                elif kind == "output":
                    assert printed == body, (printed, body)
        finally:
            if worker is not None:
                with suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    worker.wait(timeout=30)
                with suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)
    # the model file the walk-through shows is the one `models add` wrote (sha256 aside)
    written = (work / "models" / "ridge" / "model.toml").read_text()
    assert 'implementation = "my_models.ridge:Regressor"' in written
    assert '[[versions]]\nversion = "2.0.0"\npath = "2.0.0.joblib"' in written
