"""Overhead: Celery vs in-process, one request at a time; no-op CPU; an ablation; ``signing``."""

from __future__ import annotations

import itertools
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from bench.data import MINILM_DIR, REAL_MODELS, jobs, minilm_onnx, repository, task_jobs, texts
from bench.driver import Client, Driver, alternate
from bench.helper import Helper
from bench.run import CORES, Ctx, cpu_seconds, med, pct, rnd, target

FAMILIES = {"sentiment": (20, 20), "clustering": (20, 20), "arima": (4, 2), "prophet": (3, 2)}
ROUNDS = (15, 3)  # full, quick: short alternating blocks, so both sides see the same machine
SINGLE = jobs("sentiment")[1]


def one_round(
    ctx: Ctx, helper: Helper, client: Client, family: str, n: int, out: dict[str, Any], **kw: Any
) -> None:
    """``n`` in-process calls, then ``n`` Celery calls (one in flight), a block each, to ``out``."""
    inputs, celery_jobs = jobs(family)
    local: list[float] = ctx.measure(partial(helper.latency, family, inputs, n, **kw))
    remote = ctx.measure(partial(client.sequential, task_jobs()[family][0], celery_jobs, n))
    for key, values in (("inproc_ms", local), ("celery_ms", remote)):
        out.setdefault(key, []).extend(values)
    out.setdefault("round_ratios", []).append(med(remote) / med(local))


def noop_cpu(ctx: Ctx, worker: Any, n: int) -> dict[str, Any]:
    """ms of CPU per ``bench.noop`` task of the worker's processes and of Redis, 64 in flight."""

    def cpu() -> tuple[float, float]:
        return sum(cpu_seconds(worker.pid).values()), sum(cpu_seconds(ctx.redis_pid).values())

    with Driver(worker, ctx.logs) as driver:
        driver.run("bench.noop", [[1]], 64, 64)  # warm

        def once() -> dict[str, Any]:
            (w0, r0), res, (w1, r1) = cpu(), driver.run("bench.noop", [[1]], n, 64), cpu()
            out = {"worker_ms": (w1 - w0) / n * 1000, "redis_ms": (r1 - r0) / n * 1000}
            return out | {"tasks_per_s": res["tasks_per_s"], "failed": res["failed"]}

        return ctx.measure(once)


def interleaved(ctx: Ctx, client: Client, helper: Helper, n: int) -> dict[str, list[float]]:
    """In turn, so that all share the moment: the model in-process, then ``sentiment.analyze``
    end to end; the model in-process, then ``bench.noop`` (the floor's no-op under the same
    conditions: the worker idle while the model ran elsewhere); the model in-process, then the
    sentiment task's body timed in the pool process and the rest of its round trip around it.
    ``after_model``: ``bench.noop`` right after a sentiment task; ``after_noop``: after a no-op
    (the caches a model's pass evicts cost the next round trip: no product code adds that)."""
    keys = ("after_model", "after_noop", "after_inproc", "body", "around", "e2e", "inproc")
    out: dict[str, list[float]] = {key: [] for key in keys}
    text = SINGLE[0][0]
    for _ in range(ctx.n(6, 2)):
        for _ in range(n):
            out["inproc"] += helper.latency("sentiment", text, 1)
            out["e2e"].append(client.call("sentiment.analyze", text)[0])
            out["after_model"].append(client.call("bench.noop", [1])[0])
            out["inproc"] += helper.latency("sentiment", text, 1)
            out["after_inproc"].append(client.call("bench.noop", [1])[0])
            out["inproc"] += helper.latency("sentiment", text, 1)
            ms, answer = client.call("bench.timed_sentiment", text)
            out["body"].append(answer["body_ms"])
            out["around"].append(ms - answer["body_ms"])
        out["after_noop"] += client.sequential("bench.noop", [([1], {})], n + 1)[1:]
    return out


def measure(
    ctx: Ctx, models: Path, families: list[str], threads: int, extras: bool = False
) -> dict[str, Any]:
    """In-process vs Celery rounds on one prefork -c 1 worker (``extras``: no-op CPU, predict;
    on MiniLM: ``interleaved``)."""
    env = {"MODELWORKERS_TORCH_THREADS": str(threads)}
    worker = ctx.worker(models, env, concurrency=1, app="bench.exp_app")
    out: dict[str, Any] = {f: {} for f in families}
    with ctx.running(worker, wait=False), Helper(models, threads=threads, logs=ctx.logs) as helper:
        ctx.ready(worker)  # the helper loaded meanwhile
        with Client(worker) as client:
            for family in families:  # warm both sides, not recorded
                helper.latency(family, jobs(family)[0], 3)
                client.sequential(task_jobs()[family][0], jobs(family)[1], 3)
            for _, f in itertools.product(range(ctx.n(*ROUNDS)), families):
                one_round(ctx, helper, client, f, ctx.n(*FAMILIES[f]), out[f])
            time.sleep(1.2)  # one heartbeat: the snapshot's serving counters are fresh
            snaps = [s for s in worker.snapshots() if s.get("node") == worker.node]
            for family, model in (("sentiment", "sentiment"), ("clustering", "customer_segments")):
                if family in out and snaps:  # the mean of every model call inside the worker
                    out[family]["worker_mean_ms"] = snaps[0]["models"][model]["latency_mean_ms"]
            if extras:
                calls = {t: (client, t) for t in ("sentiment.analyze", "models.predict")}
                predict = [(["sentiment", t], {}) for t in texts()[:64]]
                jobs_ = {"sentiment.analyze": SINGLE, "models.predict": predict}
                out["predict_vs_analyze"] = alternate(ctx, calls, jobs_, ctx.n(10, 3), 20)
                out["noop_cpu"] = noop_cpu(ctx, worker, ctx.n(2000, 500))
            if models.name.startswith("minilm"):
                out["sentiment"]["interleaved"] = ctx.measure(
                    partial(interleaved, ctx, client, helper, 40)
                )
    return out


ABLATION: dict[str, tuple[dict[str, str], list[str]]] = {
    "product config": ({}, []),
    "+ task events (Flower watching)": ({"BENCH_TASK_EVENTS": "1"}, []),
    "+ result_extended": ({"BENCH_RESULT_EXTENDED": "1"}, []),
    "+ task_track_started": ({"BENCH_TRACK_STARTED": "1"}, []),
    "--loglevel WARNING": ({}, ["--loglevel", "WARNING"]),
    "solo pool (no parent/child hop)": ({}, ["--pool", "solo"]),
}
FLOOR = "bench.noop on the product config (Celery + Redis floor)"


def ablation(ctx: Ctx, threads: int) -> dict[str, Any]:
    """tiny-bert's p50 with celeryconfig.py settings switched (exp_app.py), a -c 1 worker each."""
    calls: dict[str, tuple[Client, str]] = {}
    with ExitStack() as stack:
        for name, (env, args) in ABLATION.items():
            env = {"MODELWORKERS_TORCH_THREADS": str(threads), **env}
            worker = ctx.worker(REAL_MODELS, env, concurrency=1, app="bench.exp_app")
            if args:
                at = worker.args.index(args[0])
                worker.args[at : at + 2] = args
            stack.enter_context(ctx.running(worker, wait=False))
            calls[name] = (stack.enter_context(Client(worker)), "sentiment.analyze")
        for client, _ in calls.values():
            ctx.ready(client.worker, timeout=240)
        calls[FLOOR] = (calls["product config"][0], "bench.noop")
        rounds = alternate(ctx, calls, SINGLE, ctx.n(10, 2), 20)
    return {name: [ms for r in rounds[name] for ms in r] for name in calls}


def run(ctx: Ctx) -> dict[str, Any]:
    threads = CORES  # a concurrency-1 worker's default, set explicitly on both sides
    families = list(FAMILIES) if not ctx.quick else ["sentiment", "clustering"]
    raw: dict[str, Any] = {"tiny-bert": measure(ctx, REAL_MODELS, families, threads, extras=True)}
    extras = {k: raw["tiny-bert"].pop(k) for k in ("predict_vs_analyze", "noop_cpu")}
    summary: dict[str, Any] = {}
    targets, noop = [], float("nan")
    if not ctx.quick:
        raw["tiny-bert, 1 thread"] = measure(ctx, REAL_MODELS, ["sentiment"], 1)  # noise-robust
        minilm = repository("minilm", sentiment=MINILM_DIR)  # one thread: the default worker's
        raw["minilm, torch, 1 thread"] = measure(ctx, minilm, ["sentiment"], 1)
        onnx = repository("minilm-onnx", sentiment=minilm_onnx())
        raw["minilm, onnx, 1 thread"] = measure(ctx, onnx, ["sentiment"], 1)
        extras["ablation"] = ablation(ctx, threads)
        base, noop = med(extras["ablation"]["product config"]), med(extras["ablation"][FLOOR])
        for name, ms in extras["ablation"].items():
            what = name if name == FLOOR else f"tiny-bert sentiment, {name}"
            summary[f"ablation p50 ms: {what}"] = f"{med(ms):.2f} ({med(ms) - base:+.2f})"
    for model, fams in raw.items():
        for family, d in fams.items():
            ip50, c50, paired = med(d["inproc_ms"]), med(d["celery_ms"]), med(d["round_ratios"])
            label = family + (f" ({model})" if family == "sentiment" else "")
            summary[f"{label}: p50 in-process / Celery ms, ratio, +ms; p99"] = (
                f"{ip50:.2f} / {c50:.2f}, {c50 / ip50:.2f}x, +{c50 - ip50:.2f}; "
                f"{pct(d['inproc_ms'], 99):.2f} / {pct(d['celery_ms'], 99):.2f}"
            )
            summary[f"{label}: median of per-round p50 ratios"] = rnd(paired)
            if d.get("worker_mean_ms") is not None:
                summary[f"{label}: model call mean ms, in-process / inside the worker"] = (
                    f"{sum(d['inproc_ms']) / len(d['inproc_ms']):.2f} / {d['worker_mean_ms']:.2f}"
                )
            if family != "sentiment":
                continue
            floor, detail = (ip50 + noop) / ip50, ""  # the model's p50 + a no-model round trip
            if noop == noop:  # measured (not in --quick)
                key = f"{label}: floor, (in-process + bench.noop p50) / in-process"
                summary[key], detail = f"{floor:.2f}x (+{noop:.2f} ms)", f"floor {floor:.2f}x"
            what = f"sentiment.analyze p50 / in-process p50 ({model})"
            targets.append(target(what, paired, 1.2, detail=detail))
            if model == "minilm, onnx, 1 thread" and noop == noop:
                after = {k: med(v) for k, v in d["interleaved"].items()}
                key = f"{label}: bench.noop p50 ms right after a sentiment task / after a no-op"
                summary[key] = f"{after['after_model']:.2f} / {after['after_noop']:.2f}"
                key = f"{label}: task body p50 ms in the pool process / the model in-process"
                summary[key] = f"{after['body']:.2f} / {after['inproc']:.2f}"
                key = f"{label}: p50 ms of the round trip around the body / bench.noop after one"
                summary[key] = f"{after['around']:.2f} / {after['after_model']:.2f}"
                e2e, inproc, noop_turn = after["e2e"], after["inproc"], after["after_inproc"]
                key = f"{label}, in turn: p50 ms end to end / in-process + bench.noop in turn"
                summary[key] = f"{e2e:.2f} / {inproc:.2f} + {noop_turn:.2f}"
                detail = (
                    f"blocks (sentiment rounds / in-process + the ablation's back-to-back "
                    f"bench.noop): {c50 / (ip50 + noop):.2f}x; "
                    f"with a no-op after a model task: {e2e / (inproc + after['after_model']):.2f}x"
                )
                what = "MiniLM (ONNX) sentiment.analyze p50 / (in-process + bench.noop p50) in turn"
                targets.append(target(what, e2e / (inproc + noop_turn), 1.1, detail=detail))
                torch_p50 = med(raw["minilm, torch, 1 thread"]["sentiment"]["inproc_ms"])
                what = "MiniLM sentiment.analyze p50, default backend / in-process torch, 1 thread"
                targets.append(target(what, c50 / torch_p50, 1.0))
            if model.startswith("tiny-bert"):
                what = f"sentiment.analyze p50 - in-process p50 ({model})"
                detail = detail and f"floor +{noop:.2f} ms"
                targets.append(target(what, c50 - ip50, 3.0, unit="ms", detail=detail))
    cpu = extras["noop_cpu"]
    summary["CPU per bench.noop task, ms: worker / Redis (64 in flight, prefork -c 1)"] = (
        f"{cpu['worker_ms']:.2f} / {cpu['redis_ms']:.2f} ({cpu['tasks_per_s']:.0f} tasks/s)"
    )
    pva = extras["predict_vs_analyze"]
    pairs = zip(pva["models.predict"], pva["sentiment.analyze"], strict=True)
    ratio = med([med(p) / med(a) for p, a in pairs])
    p50 = {k: med([x for r in v for x in r]) for k, v in pva.items()}
    key = "p50 ms models.predict / sentiment.analyze (tiny-bert), ratio"
    summary[key] = f"{p50['models.predict']:.2f} / {p50['sentiment.analyze']:.2f}, {ratio:.3f}x"
    targets.append(target("models.predict p50 / sentiment.analyze p50", ratio, 1.05))
    config = {"torch_threads": threads, "worker": "prefork -c 1", "rounds": ctx.n(*ROUNDS)}
    config["ratio"] = "median over rounds of (Celery p50 / in-process p50) in that round"
    return {"raw": raw | extras, "summary": summary, "targets": targets, "config": config}


def signing(ctx: Ctx) -> dict[str, Any]:
    """What MESSAGE_SIGNING adds: a signing and a plain node, a client each; sign/verify alone."""
    from celery.security.certificate import Certificate
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    from harness.signing import cert_store, make_identity
    from shared.settings import Settings
    from workers.client import ModelClient
    from workers.signing import Verifier

    folder = Path(tempfile.mkdtemp(prefix="signing-", dir=ctx.logs))
    worker_id, client_id = (make_identity(folder / "keys", who) for who in ("worker", "client"))
    store = cert_store(folder / "store", worker_id, client_id)
    models = repository("signing", only=("customer_segments",))
    keys = {"message_signing": True, "signing_key": client_id.key, "signing_cert": client_id.cert}
    times: dict[str, list[float]] = {"json": [], "signed": []}
    with ExitStack() as stack:
        clients = {}
        for name, env in (("json", {}), ("signed", worker_id.env(store))):
            node = ctx.worker(models, env, concurrency=1, app="bench.exp_app")
            worker = stack.enter_context(ctx.running(node))
            signed = {**keys, "signing_cert_store": store} if name == "signed" else {}
            where = {"task_queue": worker.queue, "key_prefix": worker.prefix}
            settings = Settings(redis_url=ctx.redis_url, **where, **signed)  # type: ignore[arg-type]
            clients[name] = stack.enter_context(ModelClient(settings=settings, timeout=30))
        for rounds, record in ((1, False), (ctx.n(8, 2), True)):  # 50 untimed tasks each first
            tasks = itertools.product(range(rounds), clients.items(), range(50))
            for _, (name, client), i in tasks:
                t0 = time.perf_counter()
                assert client.result(client.send("bench.noop", i)) == i
                times[name] += [(time.perf_counter() - t0) * 1000] if record else []
    key, cert = PrivateKey(client_id.key.read_text()), Certificate(client_id.cert.read_text())
    serializer, verifier, n = SecureSerializer(key, cert, None), Verifier(str(store)), 2000
    t0 = time.perf_counter()
    for _ in range(n):
        body = serializer.serialize([[1], {}, {"callbacks": None, "errbacks": None, "chain": None}])
    sign_us, t0 = (time.perf_counter() - t0) / n * 1e6, time.perf_counter()
    for _ in range(n):
        verifier.open(body.encode() if isinstance(body, str) else body)
    verify_us, p50 = (time.perf_counter() - t0) / n * 1e6, {k: med(v) for k, v in times.items()}
    summary = {f"{k}: p50 / p90 ms": f"{p50[k]:.2f} / {pct(v, 90):.2f}" for k, v in times.items()}
    key = "signed - json p50 ms; signed / json"
    summary[key] = f"{p50['signed'] - p50['json']:+.2f}; {p50['signed'] / p50['json']:.2f}x"
    summary["in-process sign / verify, microseconds"] = f"{sign_us:.0f} / {verify_us:.0f}"
    raw = {"times_ms": times, "sign_us": sign_us, "verify_us": verify_us}
    return {"raw": raw, "summary": summary}
