"""The Grafana dashboard and its provisioning are well formed (PromQL parsing: test_deploy_prometheus)."""

from __future__ import annotations

from pathlib import Path

import yaml

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"


def datasource_uid() -> str:
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    return source["uid"]


def test_every_panel_queries_the_provisioned_datasource(dashboard: dict) -> None:
    uid = datasource_uid()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        targets = panel.get("targets", [])
        assert targets and all(target.get("expr") for target in targets), panel["title"]
        assert all(target.get("datasource", panel["datasource"])["uid"] == uid for target in targets)
        assert len({target["refId"] for target in targets}) == len(targets), panel["title"]


def test_panel_ids_unique_and_laid_out_on_the_grid(dashboard: dict) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_required_panels_present(dashboard: dict) -> None:
    text = "\n".join(
        f"{panel['title']} {target['expr']}" for panel in dashboard["panels"] for target in panel["targets"]
    )
    for needle in (
        "robustdiff_images_generated_total",
        "robustdiff_images_purified_total",
        "by (route, status)",
        "robustdiff_request_duration_seconds_bucket",
        "robustdiff_queue_wait_seconds_bucket",
        "max by (model) (robustdiff_queue_size",
        "robustdiff_batch_size_bucket",
        "by (reason) (rate(robustdiff_failures_total",
        "robustdiff_dead_letter_size",
        "robustdiff_jobs_reclaimed_total",
        "robustdiff_workers_alive",
        "robustdiff_worker_heartbeat_age_seconds",
        "robustdiff_gpu_memory_used_bytes",
        "robustdiff_step_duration_seconds_bucket",
    ):
        assert needle in text, needle
    for metric in ("robustdiff_request_duration_seconds", "robustdiff_queue_wait_seconds"):
        for quantile in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate({metric}_bucket" in text, (
                metric,
                quantile,
            )


def test_dashboard_provider_points_at_the_mounted_folder(root: Path) -> None:
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "robustdiff.yml").read_text())[
        "providers"
    ]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
