"""Every metric and label the dashboard and the alerts use exists in docs/METRICS.md."""

from __future__ import annotations

import re

import pytest

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Series Prometheus itself attaches or produces, outside the contract.
PROMETHEUS_LABELS = {"job", "instance"}
PROMETHEUS_METRICS = {"up": frozenset(PROMETHEUS_LABELS)}

KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR = re.compile(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
IDENTIFIER = re.compile(r"\b([a-zA-Z_:][\w:]*)\b(\s*\()?")


def metric_names(promql: str) -> set[str]:
    """Metric names in an expression: identifiers that are not functions, keywords or labels."""
    text = GROUPING.sub(" ", re.sub(r"\{[^}]*\}", " ", STRING.sub('""', promql)))
    text = re.sub(r"\[[^\]]*\]", " ", text)
    return {
        name
        for name, call in IDENTIFIER.findall(text)
        if not call and name.lower() not in KEYWORDS and not re.fullmatch(r"\d\w*", name)
    }


def resolve(name: str, contract: dict) -> tuple[str, frozenset[str]]:
    """(problem or "", labels the series carries) for a metric name used in PromQL."""
    if name in PROMETHEUS_METRICS:
        return "", PROMETHEUS_METRICS[name]
    metric = contract.get(name)
    if metric is not None:
        if metric.type == "histogram":
            return f"{name} is a histogram: use {name}_bucket, _sum or _count", frozenset()
        return "", metric.labels | PROMETHEUS_LABELS
    for suffix in HISTOGRAM_SUFFIXES:
        base = contract.get(name.removesuffix(suffix))
        if name.endswith(suffix) and base is not None:
            if base.type != "histogram":
                return f"{name}: {base.name} is a {base.type}, not a histogram", frozenset()
            extra = {"le"} if suffix == "_bucket" else set()
            return "", base.labels | PROMETHEUS_LABELS | extra
    return f"{name} is not in docs/METRICS.md", frozenset()


def problems(promql: str, contract: dict) -> list[str]:
    found, known = [], {}
    for name in metric_names(promql):
        problem, labels = resolve(name, contract)
        if problem:
            found.append(problem)
        known[name] = labels
    for name, matchers in SELECTOR.findall(STRING.sub('""', promql)):
        for label in MATCHER_LABEL.findall(matchers):
            if name in known and known[name] and label not in known[name]:
                found.append(f"{name} has no label {label!r}")
    everything = set().union(*known.values()) if known else set()
    for group in GROUPING.findall(promql):
        for label in filter(None, (item.strip() for item in group.split(","))):
            if label not in everything:
                found.append(f"grouping label {label!r} is on none of {sorted(known)}")
    return found


def test_contract_table_parses(metrics_contract: dict) -> None:
    assert {"robustdiff_requests_total", "robustdiff_queue_size", "robustdiff_batch_size"} <= set(
        metrics_contract
    )
    for metric in metrics_contract.values():
        assert metric.type in {"counter", "gauge", "histogram"}, metric
        assert (metric.type == "counter") == metric.name.endswith("_total"), metric


def test_checker_catches_mistakes(metrics_contract: dict) -> None:
    assert problems("rate(robustdiff_batch_size[1m])", metrics_contract)
    assert problems("robustdiff_queue_size_bucket", metrics_contract)
    assert problems("robustdiff_no_such_total", metrics_contract)
    assert problems("sum by (model) (rate(robustdiff_failures_total[1m]))", metrics_contract)
    assert problems('robustdiff_requests_total{model="x"}', metrics_contract)
    assert not problems(
        'histogram_quantile(0.9, sum by (le) (rate(robustdiff_queue_wait_seconds_bucket{model=~".*"}[1m])))',
        metrics_contract,
    )


@pytest.mark.parametrize("source", ["dashboard_exprs", "alert_exprs"])
def test_queries_use_only_contract_metrics(source: str, metrics_contract: dict, request) -> None:
    exprs = request.getfixturevalue(source)
    assert exprs
    failures = {expr.where: found for expr in exprs if (found := problems(expr.promql, metrics_contract))}
    assert not failures


def test_dashboard_covers_every_worker_and_api_metric(dashboard_exprs: list, metrics_contract: dict) -> None:
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for expr in dashboard_exprs
        for name in metric_names(expr.promql)
    }
    assert set(metrics_contract) - used == set()
