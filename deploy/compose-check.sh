#!/usr/bin/env bash
# Brings the compose stack (docker-compose.yml + docker-compose.cpu.yml) up for real with podman and
# checks it: the image builds, every service comes up healthy, /readyz is ready, /sample and /purify
# answer, every Prometheus target is up and every Grafana dashboard query returns data after traffic.
#
#   deploy/compose-check.sh            # as root on Debian 12; about 10 min on a fresh 2-core machine
#
# Then it kills every worker while jobs run: the restart policy must bring them back, they must
# reclaim and finish every accepted job, and Prometheus must count the reclaimed jobs.
# It needs no Docker engine and no container registry: on a fresh machine it installs podman, runc,
# debootstrap and the CNI dnsname plugin with apt and podman-compose with pip, then builds the base
# images the files name (debian:bookworm-slim, python:3.11-slim, redis:7, prom/prometheus) locally
# from Debian packages. Grafana is not started (no package of its server can be had here); its
# dashboard queries are run against the live Prometheus instead. Only loopback ports are published
# and only loopback addresses are checked. Re-running reuses what exists; the stack it started
# (containers, network, volumes) is removed at exit, the images are kept.
#
# Knobs (environment): COMPOSE_CHECK_DIR (work folder, default /var/tmp/robustdiff-compose-check),
# COMPOSE_CHECK_WORKERS (worker replicas, default 2), COMPOSE_CHECK_TIMEOUT_S (each wait, default
# 600), COMPOSE_CHECK_BUILD_TIMEOUT_S (each image build, default 3600), COMPOSE_CHECK_TORCH_INDEX
# (torch's wheel index for the build; default: this machine's pip configuration when it has one).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${COMPOSE_CHECK_DIR:-/var/tmp/robustdiff-compose-check}
WORKERS=${COMPOSE_CHECK_WORKERS:-2}
TIMEOUT_S=${COMPOSE_CHECK_TIMEOUT_S:-600}
BUILD_TIMEOUT_S=${COMPOSE_CHECK_BUILD_TIMEOUT_S:-3600}
PODMAN_COMPOSE_VERSION=1.6.0
PROJECT=robustdiffcheck
SERVICES=(redis api worker prometheus)
IMAGE=robustdiff:cpu
START=$(date +%s)

export CONTAINERS_CONF="$WORK/containers.conf"
# Interpolation only: Grafana is not started, but the base file requires its password to be set.
export GRAFANA_ADMIN_PASSWORD=compose-check-not-started

say() { printf '[compose-check %4ss] %s\n' "$(($(date +%s) - START))" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (podman, apt-get and debootstrap need it)"
mkdir -p "$WORK"

install_host_packages() {
    local missing=() pkg
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    # Compose's service names resolve on podman's CNI networks only through dnsname (and dnsmasq).
    [ -x /usr/lib/cni/dnsname ] || missing+=(golang-github-containernetworking-plugin-dnsname)
    for pkg in iptables dnsmasq-base uidmap; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ ${#missing[@]} -gt 0 ]; then
        say "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# crun fails here on setrlimit and on hybrid cgroups; without systemd, cgroupfs and a file event log.
write_containers_conf() {
    cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
}

# podman-compose 1.6 understands the `!reset` and `!override` tags the CPU override uses (Debian's 1.0 does not).
install_podman_compose() {
    PODMAN_COMPOSE="$WORK/venv/bin/podman-compose"
    if ! "$PODMAN_COMPOSE" --version 2>/dev/null | grep -q "$PODMAN_COMPOSE_VERSION"; then
        say "pip install podman-compose==$PODMAN_COMPOSE_VERSION"
        python3 -m venv "$WORK/venv"
        "$WORK/venv/bin/pip" install --quiet "podman-compose==$PODMAN_COMPOSE_VERSION"
    fi
}

# debian:bookworm-slim from debootstrap, then the other bases FROM it with Debian's packages.
build_base_images() {
    if ! podman image exists docker.io/library/debian:bookworm-slim; then
        say "debootstrap bookworm (minbase) -> debian:bookworm-slim"
        rm -rf "$WORK/rootfs"
        timeout "$BUILD_TIMEOUT_S" debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/* \
            "$WORK"/rootfs/usr/share/doc/* "$WORK"/rootfs/usr/share/man/* "$WORK"/rootfs/usr/share/locale/*
        tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["bash"]' - docker.io/library/debian:bookworm-slim >/dev/null
        rm -rf "$WORK/rootfs"
    fi
    local name
    for name in python redis prometheus; do
        local tag
        case $name in
            python) tag=docker.io/library/python:3.11-slim ;;
            redis) tag=docker.io/library/redis:7 ;;
            prometheus) tag=docker.io/prom/prometheus:v2.55.1 ;;
        esac
        podman image exists "$tag" && continue
        say "building the stand-in $tag from Debian packages"
        mkdir -p "$WORK/$name"
        base_containerfile "$name" >"$WORK/$name/Containerfile"
        timeout "$BUILD_TIMEOUT_S" podman build --quiet --format docker --network host -t "$tag" "$WORK/$name" >/dev/null
    done
}

base_containerfile() {
    local label='LABEL org.opencontainers.image.description="stand-in built from Debian 12 packages by deploy/compose-check.sh"'
    echo 'FROM docker.io/library/debian:bookworm-slim'
    echo "$label"
    case $1 in
        python) cat <<'EOF'
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && ln -s /usr/bin/python3 /usr/local/bin/python
CMD ["python3"]
EOF
            ;;
        # Like the official image: runs as redis in /data, protected mode off (other containers connect).
        redis) cat <<'EOF'
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data \
    && printf '#!/bin/sh\nif [ "$1" = redis-server ]; then shift; exec redis-server --protected-mode no "$@"; fi\nexec "$@"\n' \
       >/usr/local/bin/entrypoint.sh && chmod 755 /usr/local/bin/entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["redis-server"]
EOF
            ;;
        # Like the official image: runs as nobody, data in /prometheus, flags as the command.
        prometheus) cat <<'EOF'
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
            ;;
    esac
}

# The build reaches packages the way this machine's pip does: its config files, the local wheel
# folders and indexes they name, and the CA bundle, all mounted read-only into the build.
pip_build_volumes() {
    local file path
    local files=(/etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf")
    for file in "${files[@]}"; do
        [ -f "$file" ] || continue
        echo "--volume=$file:${file/#$HOME//root}:ro"
        # Absolute paths the config names (find-links, file:// indexes, constraints, cert).
        grep -oE '(file://)?/[^ "'"'"']+' "$file" | sed 's#^file://##' | while read -r path; do
            case $path in
                */simple | */simple/) path=$(dirname "$path") ;;
            esac
            [ -e "$path" ] && echo "--volume=$path:$path:ro"
        done
    done
    [ -f /etc/ssl/certs/ca-certificates.crt ] && echo "--volume=/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"
    return 0
}

build_image() {
    local volumes
    mapfile -t volumes < <(pip_build_volumes | sort -u)
    # With this machine's pip configuration mounted, it (local wheels, a mirror) picks the torch
    # build too, rather than download.pytorch.org; COMPOSE_CHECK_TORCH_INDEX=URL sets the index.
    local torch_index=https://download.pytorch.org/whl
    [ ${#volumes[@]} -gt 0 ] && torch_index=""
    torch_index=${COMPOSE_CHECK_TORCH_INDEX-$torch_index}
    say "building $IMAGE (--format docker keeps the HEALTHCHECK; ${#volumes[@]} read-only build mounts)"
    local t0
    t0=$(date +%s)
    timeout "$BUILD_TIMEOUT_S" podman build --format docker --network host "${volumes[@]}" \
        --build-arg VARIANT=cpu --build-arg "TORCH_INDEX=$torch_index" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log" >&2; die "image build (log: $WORK/build.log)"; }
    BUILD_S=$(($(date +%s) - t0))
    IMAGE_BYTES=$(podman image inspect "$IMAGE" --format '{{.Size}}')
    say "built $IMAGE in ${BUILD_S} s, $((IMAGE_BYTES / 1000000)) MB"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

compose() {
    "$PODMAN_COMPOSE" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$ROOT/docker-compose.cpu.yml" "$@"
}

# podman-compose 1.6's `down` misses the replicas of a scaled service (worker_2 keeps redis_1, the
# network and the volumes in use): whatever carries the project's label goes too.
remove_stack() {
    local ids
    timeout 300 "$PODMAN_COMPOSE" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$ROOT/docker-compose.cpu.yml" \
        down -v -t 10 >"$WORK/down.log" 2>&1 || true
    podman pod rm -f -t 10 "pod_$PROJECT" >/dev/null 2>&1 || true
    ids=$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT")
    [ -z "$ids" ] || echo "$ids" | xargs podman rm -f -t 10 >/dev/null
    ids=$(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT")
    [ -z "$ids" ] || echo "$ids" | xargs podman volume rm -f >/dev/null
    if podman network exists "${PROJECT}_default"; then podman network rm -f "${PROJECT}_default" >/dev/null; fi
}

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local rc=$? c
    [ -n "${HEALTH_PID:-}" ] && kill "$HEALTH_PID" 2>/dev/null
    if [ "$rc" != 0 ]; then
        for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
            echo "--- last log lines of $c ---" >&2
            podman logs --tail 30 "$c" >&2 2>&1 || true
        done
    fi
    say "removing the stack (containers, pod, network, volumes)"
    remove_stack
    [ -z "$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT")" ] || say "containers of $PROJECT are left"
    say "exit $rc after $(($(date +%s) - START)) s"
}

# Without systemd podman runs no health checks by itself: run each container's check every 5 s.
health_loop() {
    while sleep 5; do
        for c in $(podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
            podman healthcheck run "$c" >/dev/null 2>&1 || true
        done
    done
}

wait_healthy() {
    local deadline=$(($(date +%s) + TIMEOUT_S)) c status pending
    while :; do
        pending=()
        for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
            status=$(podman inspect "$c" --format '{{.State.Status}} {{.State.Healthcheck.Status}}')
            case $status in
                "running healthy" | "running ") ;;
                running*) pending+=("$c:${status#running }") ;;
                *) die "$c is ${status% *}" ;;
            esac
        done
        [ ${#pending[@]} = 0 ] && return 0
        [ "$(date +%s)" -lt "$deadline" ] || die "not healthy within $TIMEOUT_S s: ${pending[*]}"
        sleep 5
    done
}

# One function, read whole before it runs (the script may be edited while a run is going on).
main() {
    install_host_packages
    write_containers_conf
    install_podman_compose
    build_base_images
    build_image

    API_PORT=$(free_port)
    PROMETHEUS_PORT=$(free_port)
    while [ "$PROMETHEUS_PORT" = "$API_PORT" ]; do PROMETHEUS_PORT=$(free_port); done
    export ROBUSTDIFF_API_PORT=$API_PORT PROMETHEUS_PORT
    remove_stack  # what an interrupted run left
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    say "compose config (podman-compose $PODMAN_COMPOSE_VERSION): merged build args and devices"
    compose config >"$WORK/config.yml"
    "$WORK/venv/bin/python" - "$WORK/config.yml" <<'EOF'
import sys, yaml
services = yaml.safe_load(open(sys.argv[1]))["services"]
for name in ("api", "worker"):
    args = services[name]["build"]["args"]
    assert args in ({"VARIANT": "cpu"}, ["VARIANT=cpu"]), f"{name} build args merged to {args}"
    assert "devices" not in services[name].get("deploy", {}).get("resources", {}).get("reservations", {}), name
EOF

    say "up: ${SERVICES[*]} with $WORKERS workers, API on 127.0.0.1:$API_PORT, Prometheus on 127.0.0.1:$PROMETHEUS_PORT"
    timeout "$TIMEOUT_S" "$PODMAN_COMPOSE" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$ROOT/docker-compose.cpu.yml" up -d --no-build --scale "worker=$WORKERS" "${SERVICES[@]}" >"$WORK/up.log" 2>&1 \
        || { tail -30 "$WORK/up.log" >&2; die "compose up (log: $WORK/up.log)"; }
    health_loop &
    HEALTH_PID=$!
    wait_healthy
    say "every container running, every health check healthy: $(podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' | tr '\n' ' ')"
    local checked=0
    for c in $(podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}} {{.Labels}}' | grep -E 'io.podman.compose.service:(api|worker)\b' | cut -d' ' -f1); do
        uid=$(podman exec "$c" id -u)
        [ "$uid" = 10001 ] || die "$c runs as uid $uid, not 10001"
        checked=$((checked + 1))
    done
    [ "$checked" = $((WORKERS + 1)) ] || die "uid checked in $checked robustdiff containers, not $((WORKERS + 1))"
    say "api and $WORKERS workers run as uid 10001"

    # The workers' processes are killed (SIGKILL from the host, as the kernel's OOM killer would)
    # with jobs in flight: the restart policy must bring them back and they must finish the jobs.
    # (`podman kill` would not do: it counts as a stop by the user, which no restart policy undoes.)
    local c pids=""
    for c in $(podman ps --filter "label=io.podman.compose.project=$PROJECT" --filter "label=io.podman.compose.service=worker" --format '{{.Names}}'); do
        pids+=" $(podman inspect "$c" --format '{{.State.Pid}}')"
    done
    python3 "$ROOT/deploy/compose_check.py" --api "http://127.0.0.1:$API_PORT" \
        --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" --workers "$WORKERS" --timeout "$TIMEOUT_S" \
        --kill-workers "kill -KILL$pids" --out "$WORK/result.json" || die "checks (results: $WORK/result.json)"

    say "PASSED: image $IMAGE built in ${BUILD_S} s ($((IMAGE_BYTES / 1000000)) MB); results in $WORK/result.json"
}

main "$@"
exit
