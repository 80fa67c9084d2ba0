"""Targets, the printed table, the throughput plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def target(name: str, value: float | None, limit: float, **kw: str) -> dict[str, Any]:
    """One target of docs/benchmarks.md: ``value op limit`` (``op`` "<=" or ">=", ``unit``,
    ``detail``); None or NaN is not measured, so not met."""
    op, unit, detail = kw.get("op", "<="), kw.get("unit", "x"), kw.get("detail", "")
    measured = value is not None and value == value
    met = measured and (value <= limit if op == "<=" else value >= limit)  # type: ignore[operator]
    shown = round(value, 3) if measured else None  # type: ignore[arg-type]
    out = {"name": name, "value": shown, "target": f"{op} {limit:g}{unit}", "unit": unit}
    return out | {"met": met, "detail": detail}


def fmt(value: Any, unit: str = "") -> str:
    if not isinstance(value, float):
        return "-" if value is None else str(value)
    return f"{value:.2f}x" if unit == "x" else f"{value:.3g}{(' ' + unit) if unit else ''}"


def print_table(results: dict[str, Any]) -> str:
    """The figures of every section, then the targets with met / not met."""
    lines = []
    for section, data in results["sections"].items():
        lines.append(f"== {section} ({data.get('seconds', 0):.0f} s)")
        lines += [f"   {p.upper()}: {data[p]}" for p in ("error", "skipped") if data.get(p)]
        lines += [f"   {k:<58} {fmt(v)}" for k, v in (data.get("summary") or {}).items()]
    targets = [(s, t) for s, data in results["sections"].items() for t in data.get("targets", [])]
    if targets:
        lines += ["", f"{'target':<62} {'value':>12} {'target':>10}  result"]
    for section, t in targets:
        row = f"{(section + ': ' + t['name'])[:62]:<62} {fmt(t['value'], t['unit']):>12}"
        row += f" {t['target']:>10}  {'met' if t['met'] else 'NOT MET'}"
        lines.append(row + (f" ({t['detail']})" if t.get("detail") else ""))
    text = "\n".join(lines)
    print(text)
    return text


CURVES = {
    "prefork_c1": "prefork -c 1, single-text tasks",
    "prefork_c2": "prefork -c 2, single-text tasks",
    "threads_w0": "threads -c 64, micro-batching, window 0 ms",
    "threads_w2": "threads -c 64, micro-batching, window 2 ms",
    "prefork_c2_onnx": "prefork -c 2, ONNX Runtime (the defaults), single-text tasks",
    "threads_w2_onnx": "threads -c 64, window 2 ms, ONNX Runtime",
}
POINTS = {
    "batch32_c1": ("analyze_batch, 32 texts/task, prefork -c 1 (2 tasks in flight)", "s"),
    "batch32_c2": ("analyze_batch, 32 texts/task, prefork -c 2 (4 tasks in flight)", "D"),
    "mlserver_adaptive": ("MLServer 1.7.1, adaptive batching (torch), 64 in flight", "*"),
}


def plot_throughput(data: dict[str, Any], path: Path, cores: int) -> Path:
    """Texts/s vs requests in flight per worker configuration, with the raw pipeline line."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for key, label in CURVES.items():
        if curve := data.get("curves", {}).get(key):
            xs = sorted(int(k) for k in curve)
            ax.plot(xs, [curve[str(x)] for x in xs], marker="o", label=label)
    for key, (label, marker) in POINTS.items():
        if value := data.get("batch_points", {}).get(key):
            ax.scatter([64], [value], marker=marker, s=60, label=label, zorder=5)
    if raw := data.get("raw_median"):
        label = "raw in-process pipeline (batch 32, 2 threads)"
        ax.axhline(raw, color="black", linestyle="--", linewidth=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="single-text requests in flight", ylabel="texts / s", ylim=(0, None))
    title = f"sentiment (MiniLM-L6 classifier) through the workers, {cores} cores; "
    ax.set_title(title + f"raw median {raw or 0:.0f} texts/s", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
