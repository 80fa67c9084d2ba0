"""Run the benchmark suite: ``python -m bench.run [--quick] [--out PATH] [--only S1,S2]``.

Starts a private Redis, then each section in turn; every worker and helper process it starts is
stopped by PID. Writes every raw measurement, the machine and the commit to ``--out`` (JSON) and
prints a table of the figures with the issue's targets (met / not met).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import cold_start, first_job, memory, overhead, reload, throughput
from bench.common import Ctx, git_commit, loadavg, machine, tmpdir
from bench.data import ROOT, ensure_cache, ensure_minilm, texts_source
from bench.report import print_table
from workers.embedded import EmbeddedRedis

SECTIONS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "cold_start": cold_start.run,
    "first_job": first_job.run,
    "overhead": overhead.run,
    "throughput": throughput.run,
    "memory": memory.run,
    "reload_under_load": reload.run,
}
# --quick: reduced repeats of the cheap sections (about a minute on 2 shared cores)
QUICK = ["overhead", "throughput"]


def write(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
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
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    names = only or (QUICK if args.quick else list(SECTIONS))
    # SIGTERM unwinds like Ctrl-C: every worker and helper is stopped by its finally block
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    t_start = time.time()
    ensure_cache()
    if any(s in names for s in ("overhead", "throughput", "memory")):
        ensure_minilm()
    logs = tmpdir("modelworkers-bench-")
    results: dict[str, Any] = {
        "meta": {
            "command": "python -m bench.run "
            + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "quick": args.quick,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "git": git_commit(),
            "texts": texts_source(),
            "logs": str(logs),
            "loadavg_start": loadavg(),
        },
        "sections": {},
    }
    results["meta"]["complete"] = False
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        same = previous["meta"]["git"]["commit"] == results["meta"]["git"]["commit"]
        if same and previous["meta"].get("quick") == args.quick:
            kept = {k: v for k, v in previous["sections"].items() if not v.get("error")}
            results["sections"].update(kept)
            results["meta"]["resumed"] = [
                *previous["meta"].get("resumed", []),
                {"date": previous["meta"]["date"], "sections": sorted(kept)},
            ]
            names = [n for n in names if n not in kept]
            print(f"resuming: kept {sorted(kept)}, running {names}", flush=True)
        else:
            print("--resume: the results file is from another commit or mode; starting over")
    failed = False
    with EmbeddedRedis() as redis_server:
        ctx = Ctx(redis_url=redis_server.url, logs=logs, quick=args.quick)
        for name in names:
            print(f"--- {name} ...", flush=True)
            t0 = time.time()
            gates_before, blocks_before = len(ctx.gates), len(ctx.blocks)
            ctx.new_section()
            entry: dict[str, Any]
            try:
                entry = SECTIONS[name](ctx)
            except Exception as exc:
                failed = True
                entry = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-4000:],
                }
                print(entry["traceback"], file=sys.stderr)
            entry["seconds"] = round(time.time() - t0, 1)
            entry["quiet_gates"] = ctx.gate_summary(gates_before)
            entry["blocks"] = ctx.block_summary(blocks_before)
            entry["loadavg_after"] = loadavg()
            results["sections"][name] = entry
            print(f"--- {name} done in {entry['seconds']:.0f} s", flush=True)
            write(out, results)  # partial results survive an interrupted run
    results["meta"]["wall_s"] = round(time.time() - t_start, 1)
    results["meta"]["sections_s"] = round(
        sum(v.get("seconds", 0) for v in results["sections"].values()), 1
    )
    results["meta"]["loadavg_end"] = loadavg()
    results["meta"]["complete"] = True
    results["table"] = print_table(results)
    write(out, results)
    print(f"\nwall time {results['meta']['wall_s']:.0f} s; results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
