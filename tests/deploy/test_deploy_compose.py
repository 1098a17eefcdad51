"""docker-compose.yml and the CPU override: schema-valid, scalable, and consistent with Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker-compose.cpu.yml"


class Reset:
    """Compose v2's `!reset` tag: the key is removed from the merged model."""

    def __init__(self, value: object) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node))
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node))
    assert isinstance(node, yaml.ScalarNode)
    return Reset(loader.construct_scalar(node))


ComposeLoader.add_constructor("!reset", _reset)


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def plain(data: object) -> object:
    """The document as the schema sees it: a `!reset` value is just its (empty) value."""
    if isinstance(data, Reset):
        return plain(data.value)
    if isinstance(data, dict):
        return {key: plain(value) for key, value in data.items()}
    if isinstance(data, list):
        return [plain(value) for value in data]
    return data


def merge(base: object, override: object) -> object:
    """Compose's merge rules, as far as these files need them (mappings merge, `!reset` removes)."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            else:
                merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


@pytest.fixture(scope="module")
def base() -> dict:
    return load(BASE)


@pytest.fixture(scope="module")
def cpu() -> dict:
    merged = merge(load(BASE), load(CPU))
    assert isinstance(merged, dict)
    return merged


def test_both_files_validate_against_compose_spec(tmp_path: Path) -> None:
    # check-jsonschema's YAML reader rejects the `!reset` tag, so the override is handed over as
    # JSON with the tag resolved; the base file is checked as written.
    override = tmp_path / "docker-compose.cpu.json"
    override.write_text(json.dumps(plain(load(CPU))))
    tool = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(BASE), str(override)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_v1_accepts_base_file() -> None:
    # Debian's docker-compose 1.29 is a second, independent parser; it cannot read `!reset`.
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose 1.29 not installed (apt-get install docker-compose); schema check still ran"
        )
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "test-only"}
    result = subprocess.run(
        [binary, "-f", str(BASE), "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_is_scalable_and_gets_a_gpu(base: dict) -> None:
    worker = base["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"] == ["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "9400" in [str(port) for port in worker["expose"]]
    assert worker["environment"]["ROBUSTDIFF_WORKER_METRICS_PORT"] == "9400"


def test_no_service_has_a_fixed_container_name(base: dict) -> None:
    assert not [name for name, service in base["services"].items() if "container_name" in service]


def test_cpu_override_drops_gpu_and_builds_cpu_image(cpu: dict) -> None:
    for name in ("api", "worker"):
        service = cpu["services"][name]
        assert service["build"]["args"]["VARIANT"] == "cpu"
        assert service["image"].endswith(":cpu")
    worker = cpu["services"]["worker"]
    assert "devices" not in worker["deploy"]["resources"]["reservations"]
    assert worker["environment"]["ROBUSTDIFF_DEVICE"] == "cpu"
    # The rest of the worker survives the merge.
    assert worker["environment"]["ROBUSTDIFF_REDIS_URL"] == "redis://redis:6379/0"


def test_api_and_worker_share_redis_with_durable_storage(base: dict) -> None:
    services = base["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert services["api"]["command"][:3] == ["serve", "--host", "0.0.0.0"]
    for name in ("api", "worker"):
        assert services[name]["environment"]["ROBUSTDIFF_REDIS_URL"] == "redis://redis:6379/0"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_prometheus_discovers_every_replica(base: dict) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job, service, port in (("robustdiff-api", "api", 8000), ("robustdiff-worker", "worker", 9400)):
        (sd,) = jobs[job]["dns_sd_configs"]
        assert (sd["names"], sd["type"], sd["port"]) == ([service], "A", port)
        assert service in base["services"]


def test_mounted_config_files_exist(base: dict) -> None:
    for name in ("prometheus", "grafana"):
        for volume in base["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_grafana_admin_password_comes_from_env(base: dict) -> None:
    env = base["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
