"""Kubernetes manifests parse and agree with the compose file, the image and the service settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The settings the deployment is built against (service/settings.py may define more).
ROBUSTDIFF_ENV = {
    "ROBUSTDIFF_REDIS_URL",
    "ROBUSTDIFF_MODELS",
    "ROBUSTDIFF_DEVICE",
    "ROBUSTDIFF_API_KEYS",
    "ROBUSTDIFF_WORKER_METRICS_PORT",
    "ROBUSTDIFF_WORKER_METRICS_HOST",
    "ROBUSTDIFF_MAX_BATCH_IMAGES",
    "ROBUSTDIFF_MAX_WAIT_MS",
    "ROBUSTDIFF_MAX_QUEUE_DEPTH",
    "ROBUSTDIFF_LOG_LEVEL",
}


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None or doc["kind"] == "Kustomization":
                continue
            assert "namespace" not in doc["metadata"], f"{path.name}: manifests must be namespace-free"
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, key
            found[key] = doc
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def container(docs: dict, deployment: str) -> dict:
    (only,) = docs[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]
    return only


def env_names(item: dict) -> set[str]:
    return {entry["name"] for entry in item.get("env", [])}


def test_kustomization_lists_existing_files_but_not_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / resource).exists() for resource in kustomization["resources"])
    assert "secret.example.yaml" not in kustomization["resources"]


def test_deployment_selectors_match_their_pods(docs: dict) -> None:
    for (kind, name), doc in docs.items():
        if kind == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    for (kind, name), doc in docs.items():
        if kind == "Service":
            selector = doc["spec"]["selector"].items()
            assert any(
                selector <= d["spec"]["template"]["metadata"]["labels"].items()
                for (k, _), d in docs.items()
                if k == "Deployment"
            ), f"Service {name} selects no pods"


def test_api_ports_and_scrape_annotations(docs: dict, compose: dict) -> None:
    api = container(docs, "robustdiff-api")
    (port,) = api["ports"]
    compose_port = int(compose["services"]["api"]["ports"][0].rsplit(":", 1)[1])
    assert port["containerPort"] == compose_port == 8000
    assert api["args"] == compose["services"]["api"]["command"]
    annotations = docs[("Deployment", "robustdiff-api")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }
    service = docs[("Service", "robustdiff-api")]["spec"]["ports"][0]
    assert service["port"] == 8000 and service["targetPort"] == port["name"]
    assert {api["readinessProbe"]["httpGet"]["path"], api["livenessProbe"]["httpGet"]["path"]} == {
        "/readyz",
        "/healthz",
    }


def test_worker_gpu_metrics_port_and_annotations(docs: dict, compose: dict) -> None:
    worker = container(docs, "robustdiff-worker")
    (port,) = worker["ports"]
    config = docs[("ConfigMap", "robustdiff-config")]["data"]
    compose_worker = compose["services"]["worker"]
    assert port["containerPort"] == int(config["ROBUSTDIFF_WORKER_METRICS_PORT"]) == 9400
    assert str(port["containerPort"]) in [str(p) for p in compose_worker["expose"]]
    assert (
        compose_worker["environment"]["ROBUSTDIFF_WORKER_METRICS_PORT"]
        == config["ROBUSTDIFF_WORKER_METRICS_PORT"]
    )
    assert worker["args"] == compose_worker["command"]
    annotations = docs[("Deployment", "robustdiff-worker")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9400"
    assert (
        worker["resources"]["requests"]["nvidia.com/gpu"]
        == worker["resources"]["limits"]["nvidia.com/gpu"]
        == 1
    )


def test_env_names_agree_with_compose_and_settings(docs: dict, compose: dict) -> None:
    config = set(docs[("ConfigMap", "robustdiff-config")]["data"])
    secret = set(yaml.safe_load((K8S / "secret.example.yaml").read_text())["stringData"])
    k8s = (
        config
        | secret
        | env_names(container(docs, "robustdiff-api"))
        | env_names(container(docs, "robustdiff-worker"))
    )
    in_compose = {
        name for service in ("api", "worker") for name in compose["services"][service]["environment"]
    }
    assert k8s <= ROBUSTDIFF_ENV and in_compose <= ROBUSTDIFF_ENV
    assert in_compose <= k8s, "a setting compose passes is missing from the Kubernetes config"
    for deployment in ("robustdiff-api", "robustdiff-worker"):
        refs = container(docs, deployment)["envFrom"]
        assert refs[0] == {"configMapRef": {"name": "robustdiff-config"}}
        assert refs[1] == {"secretRef": {"name": "robustdiff-secrets", "optional": True}}, (
            "the Secret must win"
        )


def test_names_exist_in_service_settings() -> None:
    settings = pytest.importorskip("service.settings", reason="service/settings.py not written yet")
    fields = {f"{settings.ENV_PREFIX}{name.upper()}" for name in settings.Settings.model_fields}
    assert fields >= ROBUSTDIFF_ENV


def test_redis_url_and_keda_point_at_the_redis_service(docs: dict) -> None:
    url = docs[("ConfigMap", "robustdiff-config")]["data"]["ROBUSTDIFF_REDIS_URL"]
    match = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", url)
    assert match, url
    host, port = match.groups()
    service = docs[("Service", host)]
    assert service["spec"]["ports"][0]["port"] == int(port)
    redis = container(docs, "redis")
    assert redis["args"][redis["args"].index("--appendonly") + 1] == "yes"
    (trigger,) = docs[("ScaledObject", "robustdiff-worker")]["spec"]["triggers"]
    assert trigger["metadata"]["address"] == f"{host}:{port}"


def test_keda_scales_the_worker_on_its_stream(docs: dict) -> None:
    spec = docs[("ScaledObject", "robustdiff-worker")]["spec"]
    assert ("Deployment", spec["scaleTargetRef"]["name"]) in docs
    assert container(docs, spec["scaleTargetRef"]["name"])["args"] == ["worker"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis-streams"
    metadata = trigger["metadata"]
    assert re.fullmatch(r"robustdiff:jobs:[A-Za-z0-9][\w.-]*", metadata["stream"])
    assert metadata["stream"] == "robustdiff:jobs:fmnist-dro-at"
    assert metadata["consumerGroup"] == "workers"
    assert int(metadata["pendingEntriesCount"]) > 0
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_pods_run_as_the_image_user(docs: dict) -> None:
    match = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert match, "Dockerfile sets no numeric USER"
    uid = int(match.group(1))
    for name in ("robustdiff-api", "robustdiff-worker"):
        pod = docs[("Deployment", name)]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
