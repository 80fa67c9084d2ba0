"""The Grafana dashboard and the Prometheus alerting rules: every metric they query is one the
code exports, the rules pass `promtool check rules`, and each alert fires and stays quiet in
`promtool test rules` (deploy/prometheus/alerts.test.yml)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "modelworkers.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
SUFFIXES = {
    "Counter": ("_total",),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "Summary": ("_sum", "_count"),
    "GaugeMetricFamily": ("",),
    "CounterMetricFamily": ("_total",),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count"),
}


def exported_families() -> dict[str, str]:
    """Every metric defined in shared/ (prometheus-client objects and custom collectors'
    families): name -> type, read from the code."""
    families = {}
    for path in (ROOT / "shared").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name | ast.Attribute)
                and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
                in SUFFIXES
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                kind = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                name = node.args[0].value
                # prometheus-client adds _total to a counter's name itself
                families[name.removesuffix("_total") if "Counter" in kind else name] = kind
    return families


def exported_series() -> set[str]:
    return {
        name + suffix for name, kind in exported_families().items() for suffix in SUFFIXES[kind]
    }


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(modelworkers_[a-zA-Z0-9_:]+)", expr))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_code_exports_the_metrics_of_the_docs() -> None:
    families = exported_families()
    assert families["modelworkers_inference"] == "Counter"
    assert families["modelworkers_inference_seconds"] == "Histogram"
    assert families["modelworkers_queue_depth"] == "GaugeMetricFamily"
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name in (
        exported_series()
        - {n + "_bucket" for n in families}
        - {n + s for n in families for s in ("_sum", "_count")}
    ):
        assert f"`{name}`" in operations, f"{name} is not in docs/operations.md"


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported() -> None:
    exported = exported_series()
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    used |= set().union(*(metric_names(r["expr"]) for r in alert_rules()))
    assert used, "no metric found in the queries"
    assert used <= exported, f"not exported by the code: {sorted(used - exported)}"
    # and the dashboard covers what is exported
    families = exported_families()
    shown = set().union(*(metric_names(e) for e in dashboard_exprs()))
    missing = [
        name
        for name, kind in families.items()
        if not any(name + s in shown for s in SUFFIXES[kind])
    ]
    assert not missing, f"exported but on no panel: {missing}"


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, used
            assert target["expr"].count("(") == target["expr"].count(")")


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("MODELWORKERS_REQUIRE_PROMTOOL"):  # CI (.ci/run) installs it
        pytest.fail("promtool is required here (MODELWORKERS_REQUIRE_PROMTOOL) but not on PATH")
    pytest.skip(
        "promtool is not installed (Debian/Ubuntu: apt-get install prometheus; elsewhere: the "
        "Prometheus release archive); CI's .ci/run installs it"
    )


def test_the_alerting_rules_pass_promtool_check() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_each_alert_fires_and_stays_quiet_in_promtool_unit_tests() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no firing case"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no quiet case"
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert {"summary", "description"} <= set(rule["annotations"])
    done = subprocess.run(
        [promtool(), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_alerts_cover_what_an_operator_must_be_woken_for() -> None:
    critical = {
        r["alert"]: r["expr"] for r in alert_rules() if r["labels"]["severity"] == "critical"
    }
    joined = " ".join(critical.values())
    assert 'status="FAILED"' in joined and "modelworkers_model_required" in joined
    assert 'status="LOADING"' in joined  # not ready for too long
    assert "modelworkers_inference_errors_total" in joined  # error rate
    assert "modelworkers_queue_oldest_age_seconds" in joined  # oldest waiting task
    latency = [r for r in alert_rules() if "modelworkers_inference_seconds_bucket" in r["expr"]]
    assert latency and "histogram_quantile(0.95" in latency[0]["expr"]


def test_docs_show_the_monitoring_files() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    for path in (DASHBOARD, ALERTS, ALERT_TESTS):
        assert str(Path(path).relative_to(ROOT)) in operations
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in operations
