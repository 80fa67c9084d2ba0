"""Run the benchmark suite: ``python -m bench.run [--quick] [--out PATH] [--only S1,S2]``.

Starts a private Redis, then each section in turn; every worker and helper process it starts is
stopped by PID. Writes every raw measurement, the machine and the commit to ``--out`` (JSON) and
prints a table of the figures with the targets in docs/benchmarks.md (met / not met).
``Runner`` (the results file and the sections' loop) is also the GPU run's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import cold_start, first_job, memory, overhead, reload, throughput
from bench.context import Ctx, git_commit, loadavg, machine
from bench.data import ROOT, ensure_cache, ensure_minilm, texts_source
from bench.report import print_table

Section = Callable[[Ctx], dict[str, Any]]
SECTIONS: dict[str, Section] = {
    "cold_start": cold_start.run,
    "first_job": first_job.run,
    "overhead": overhead.run,
    "throughput": throughput.run,
    "memory": memory.run,
    "reload_under_load": reload.run,
}
QUICK = ["overhead", "throughput"]  # --quick: reduced repeats of the cheap sections


class Runner:
    """One results file: ``meta``, then every section, written as soon as each ends (partial
    results survive an interrupted run)."""

    def __init__(self, out: Path, module: str, argv: list[str], **meta: Any) -> None:
        self.out = out if out.is_absolute() else ROOT / out
        self.t0 = time.time()
        self.logs = Path(tempfile.mkdtemp(prefix=f"modelworkers-{module.replace('.', '-')}-"))
        self.results: dict[str, Any] = {
            "meta": {
                "command": f"python -m {module} " + " ".join(shlex.quote(a) for a in argv),
                **meta,
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": machine(),
                "git": git_commit(),
                "texts": texts_source(),
                "logs": str(self.logs),
                "loadavg_start": loadavg(),
                "complete": False,
            },
            "sections": {},
        }
        # SIGTERM unwinds like Ctrl-C (every process is stopped by its finally block); a second
        # one is ignored so that it cannot cut the clean-up short
        signal.signal(signal.SIGTERM, self._on_term)

    @staticmethod
    def _on_term(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(143)

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.out)

    def section(self, ctx: Ctx, name: str, fn: Section) -> dict[str, Any]:
        print(f"--- {name} ...", flush=True)
        t0, gates, blocks = time.time(), len(ctx.gates), len(ctx.blocks)
        ctx.new_section()
        entry: dict[str, Any]
        try:
            entry = fn(ctx)
        except Exception as exc:
            entry = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            entry["traceback"] = entry["traceback"][-4000:]
            print(entry["traceback"], file=sys.stderr, flush=True)
        except BaseException:  # SIGTERM / Ctrl-C: keep what this section had, then unwind
            entry = self.results["sections"].get(name, {})
            entry["error"] = "interrupted (SIGTERM or Ctrl-C) during this section"
            raise
        finally:
            entry["seconds"] = round(time.time() - t0, 1)
            entry.update(ctx.summaries(gates, blocks))
            entry["loadavg_after"] = loadavg()
            self.results["sections"][name] = entry
            self.write()
        print(f"--- {name} done in {entry['seconds']:.0f} s", flush=True)
        return entry

    def finish(self, complete: bool = True) -> list[str]:
        """Close the results; return the sections that failed."""
        meta, sections = self.results["meta"], self.results["sections"]
        meta["wall_s"] = round(time.time() - self.t0, 1)
        meta["sections_s"] = round(sum(v.get("seconds", 0) for v in sections.values()), 1)
        meta["loadavg_end"] = loadavg()
        meta["complete"] = complete
        self.results["table"] = print_table(self.results)
        self.write()
        print(f"\nwall time {meta['wall_s']:.0f} s; results: {self.out}", flush=True)
        return [k for k, v in sections.items() if v.get("error") or v.get("ok") is False]

    def resume(self) -> list[str]:
        """Keep the sections of an interrupted run of the same commit and mode in ``out``;
        returns their names."""
        if not self.out.exists():
            return []
        previous, meta = json.loads(self.out.read_text()), self.results["meta"]
        old = previous["meta"]
        if (old["git"]["commit"], old.get("quick")) != (meta["git"]["commit"], meta.get("quick")):
            print("--resume: the results file is from another commit or mode; starting over")
            return []
        kept = {k: v for k, v in previous["sections"].items() if not v.get("error")}
        self.results["sections"].update(kept)
        resumed = {"date": old["date"], "sections": sorted(kept)}
        meta["resumed"] = [*old.get("resumed", []), resumed]
        return sorted(kept)


def main(argv: list[str] | None = None) -> int:
    from workers.embedded import EmbeddedRedis

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced repeats, cheap sections")
    parser.add_argument("--out", default="bench/results/latest.json", help="JSON results path")
    parser.add_argument("--only", default="", help=f"comma-separated of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the sections already in --out (from an interrupted run of the same commit) "
        "and run only the missing ones",
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := [s for s in only if s not in SECTIONS]:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    names = only or (QUICK if args.quick else list(SECTIONS))
    ensure_cache()
    if any(s in names for s in ("overhead", "throughput", "memory")):
        ensure_minilm()
    argv = sys.argv[1:] if argv is None else argv
    runner = Runner(Path(args.out), "bench.run", argv, quick=args.quick)
    if args.resume:
        kept = runner.resume()
        names = [n for n in names if n not in kept]
        print(f"resuming: kept {kept}, running {names}", flush=True)
    with EmbeddedRedis() as redis_server:
        ctx = Ctx(redis_url=redis_server.url, logs=runner.logs, quick=args.quick)
        for name in names:
            runner.section(ctx, name, SECTIONS[name])
    return 1 if runner.finish() else 0


if __name__ == "__main__":
    raise SystemExit(main())
