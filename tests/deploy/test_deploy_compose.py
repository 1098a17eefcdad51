"""docker-compose.yml and the CPU override, as Docker Compose v2 and podman-compose 1.6 read and merge them.

Both tools run offline (`config` needs no engine): Compose v2 validates each file against the compose
specification and merges base+cpu; podman-compose must merge the override the same way (it appends
sequences unless told `!override`). deploy/compose-check.sh brings the stack up for real, on demand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker-compose.cpu.yml"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(
            f"{path} not found: `make compose-tools` installs Docker Compose v2 and podman-compose 1.6"
        )
    return str(path)


def run(cmd: list[str], password: str | None = "test-only") -> subprocess.CompletedProcess[str]:
    # A fixed environment: the files' defaults, not this shell's ROBUSTDIFF_*/port variables, are checked.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if password is not None:
        env["GRAFANA_ADMIN_PASSWORD"] = password
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def compose_v2(*files: Path) -> dict:
    """The model Docker Compose v2 builds from the files (validated against the compose spec)."""
    args = [arg for file in files for arg in ("-f", str(file))]
    result = run([tool("docker-compose-v2"), *args, "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def podman_compose(*files: Path) -> dict:
    args = [arg for file in files for arg in ("-f", str(file))]
    # --dry-run: no podman needed to print the merged file.
    result = run([tool("podman-compose"), "--dry-run", *args, "config"])
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def base() -> dict:
    return compose_v2(BASE)


@pytest.fixture(scope="module")
def cpu() -> dict:
    return compose_v2(BASE, CPU)


def test_compose_v2_refuses_a_broken_file(tmp_path: Path) -> None:
    # The validation is real: a misspelt key in a copy of the base file is refused by name.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(BASE.read_text().replace("    healthcheck:", "    helthcheck:", 1))
    result = run([tool("docker-compose-v2"), "-f", str(broken), "config", "-q"])
    assert result.returncode != 0 and "helthcheck" in result.stderr, result.stderr


def test_worker_is_scalable_and_gets_a_gpu(base: dict) -> None:
    worker = base["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"] == ["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["expose"] == ["9400"]
    assert worker["environment"]["ROBUSTDIFF_WORKER_METRICS_PORT"] == "9400"
    assert "9400/metrics" in " ".join(worker["healthcheck"]["test"])


def test_no_service_has_a_fixed_container_name(base: dict) -> None:
    assert not [name for name, service in base["services"].items() if "container_name" in service]


def test_cpu_override_drops_gpu_and_builds_cpu_image(base: dict, cpu: dict) -> None:
    for name in ("api", "worker"):
        service = cpu["services"][name]
        assert service["build"]["args"] == {"VARIANT": "cpu"}
        assert service["image"] == "robustdiff:cpu"
    worker = cpu["services"]["worker"]
    assert "devices" not in worker["deploy"]["resources"]["reservations"]
    assert worker["environment"]["ROBUSTDIFF_DEVICE"] == "cpu"
    # The rest of the worker survives the merge.
    unchanged = {key: value for key, value in base["services"]["worker"]["environment"].items()}
    unchanged["ROBUSTDIFF_DEVICE"] = "cpu"
    assert worker["environment"] == unchanged
    assert worker["healthcheck"] == base["services"]["worker"]["healthcheck"]


@pytest.mark.parametrize("service", ["api", "worker"])
def test_podman_compose_merges_the_cpu_override_like_compose_v2(cpu: dict, service: str) -> None:
    merged = podman_compose(BASE, CPU)["services"][service]
    expected = cpu["services"][service]
    args = merged["build"]["args"]
    # podman-compose keeps args as given (a mapping) or as KEY=VALUE items; either way one VARIANT.
    as_dict = dict(item.split("=", 1) for item in args) if isinstance(args, list) else args
    assert as_dict == expected["build"]["args"] and len(args) == 1, args
    assert merged["image"] == expected["image"]
    assert merged["environment"] == expected["environment"]
    assert "devices" not in merged.get("deploy", {}).get("resources", {}).get("reservations", {})


def test_published_ports_are_loopback_by_default(base: dict) -> None:
    published = {name: service["ports"] for name, service in base["services"].items() if service.get("ports")}
    assert set(published) == {"api", "prometheus", "grafana"}
    for name, ports in published.items():
        assert [port["host_ip"] for port in ports] == ["127.0.0.1"], (name, ports)


def test_api_and_worker_share_redis_with_durable_storage(base: dict) -> None:
    services = base["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert [(v["type"], v["source"], v["target"]) for v in redis["volumes"]] == [
        ("volume", "redis-data", "/data")
    ]
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


def test_mounted_config_files_exist_and_are_read_only(base: dict) -> None:
    for name in ("prometheus", "grafana"):
        binds = [volume for volume in base["services"][name]["volumes"] if volume["type"] == "bind"]
        assert binds, name
        for volume in binds:
            assert Path(volume["source"]).exists(), f"{name} mounts missing {volume['source']}"
            assert volume["read_only"], volume


def test_grafana_admin_password_comes_from_env(base: dict) -> None:
    refused = run([tool("docker-compose-v2"), "-f", str(BASE), "config", "-q"], password=None)
    assert refused.returncode != 0 and "set GRAFANA_ADMIN_PASSWORD" in refused.stderr, refused.stderr
    env = base["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "test-only"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
