"""Prometheus config, alert rules and every dashboard query, checked by promtool (the real parser)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _promtool(promtool: str, *args: str, cwd: Path = PROM_DIR) -> str:
    result = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_config_is_valid(promtool: str) -> None:
    # Also checks the rule files the config names.
    _promtool(promtool, "check", "config", "prometheus.yml")


def test_alert_rules_are_valid(promtool: str) -> None:
    _promtool(promtool, "check", "rules", "alerts.yml")


def test_alert_unit_tests_pass(promtool: str) -> None:
    _promtool(promtool, "test", "rules", "alerts_test.yml")


def test_every_alert_has_a_firing_and_a_silent_unit_test(alert_rules: list[dict]) -> None:
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules}
    assert names - firing == set(), "alerts never shown to fire"
    assert names - silent == set(), "alerts never shown to stay silent"


def test_alerts_carry_severity_and_summary(alert_rules: list[dict]) -> None:
    for rule in alert_rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_dashboard_queries_parse(promtool: str, dashboard_exprs: list, tmp_path: Path) -> None:
    # promtool has no "parse this expression" command; recording rules are parsed with the same parser.
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": expr.promql, "labels": {"where": expr.where}}
        for i, expr in enumerate(dashboard_exprs)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    output = _promtool(promtool, "check", "rules", str(path), cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in output
