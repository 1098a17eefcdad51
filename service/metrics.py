"""Prometheus metric objects, exactly as docs/METRICS.md lists them.

The API and the worker each get their own registry, so a process exposes only the series it owns
(``robustdiff_failures_total`` exists in both, counted where the failure is seen).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = tuple(float(2**i) for i in range(10))  # 1, 2, 4, ..., 512

FAILURE_REASONS = (
    "validation",
    "queue_full",
    "redis_unavailable",
    "busy",
    "timeout",
    "worker_error",
    "dead_letter",
)

API_REGISTRY = CollectorRegistry(auto_describe=True)
WORKER_REGISTRY = CollectorRegistry(auto_describe=True)

# --- API process ---------------------------------------------------------------------------------
REQUESTS = Counter(
    "robustdiff_requests_total", "HTTP requests answered", ["route", "status"], registry=API_REGISTRY
)
REQUEST_DURATION = Histogram(
    "robustdiff_request_duration_seconds",
    "Time from request received to response sent",
    ["route"],
    buckets=DURATION_BUCKETS,
    registry=API_REGISTRY,
)
QUEUE_SIZE = Gauge(
    "robustdiff_queue_size",
    "Jobs waiting in the model's stream (not yet delivered to a worker)",
    ["model"],
    registry=API_REGISTRY,
)
DEAD_LETTER_SIZE = Gauge(
    "robustdiff_dead_letter_size", "Entries in the dead-letter stream", registry=API_REGISTRY
)
WORKERS_ALIVE = Gauge(
    "robustdiff_workers_alive",
    "Workers whose heartbeat is younger than the liveness timeout",
    registry=API_REGISTRY,
)
HEARTBEAT_AGE = Gauge(
    "robustdiff_worker_heartbeat_age_seconds",
    "Seconds since each known worker's last heartbeat",
    ["worker"],
    registry=API_REGISTRY,
)
API_FAILURES = Counter("robustdiff_failures_total", "Failures by reason", ["reason"], registry=API_REGISTRY)

# --- worker process ------------------------------------------------------------------------------
QUEUE_WAIT = Histogram(
    "robustdiff_queue_wait_seconds",
    "Time a job waited between enqueue and joining the running batch",
    ["model", "kind"],
    buckets=DURATION_BUCKETS,
    registry=WORKER_REGISTRY,
)
INFERENCE_DURATION = Histogram(
    "robustdiff_inference_duration_seconds",
    "Compute time of one job (the network steps its images were part of)",
    ["model", "sampler", "kind"],
    buckets=DURATION_BUCKETS,
    registry=WORKER_REGISTRY,
)
STEP_DURATION = Histogram(
    "robustdiff_step_duration_seconds",
    "Time of one sampler step (one network evaluation)",
    ["model", "sampler"],
    buckets=DURATION_BUCKETS,
    registry=WORKER_REGISTRY,
)
BATCH_SIZE = Histogram(
    "robustdiff_batch_size",
    "Images in the running batch at each network evaluation",
    ["model"],
    buckets=BATCH_BUCKETS,
    registry=WORKER_REGISTRY,
)
IMAGES_GENERATED = Counter(
    "robustdiff_images_generated_total", "Images returned by /sample", ["model"], registry=WORKER_REGISTRY
)
IMAGES_PURIFIED = Counter(
    "robustdiff_images_purified_total",
    "Purified images returned by /purify",
    ["model"],
    registry=WORKER_REGISTRY,
)
JOBS = Counter(
    "robustdiff_jobs_total", "Jobs finished, by final status", ["kind", "status"], registry=WORKER_REGISTRY
)
WORKER_FAILURES = Counter(
    "robustdiff_failures_total", "Failures by reason", ["reason"], registry=WORKER_REGISTRY
)
JOBS_RECLAIMED = Counter(
    "robustdiff_jobs_reclaimed_total",
    "Jobs taken over from a dead worker (XAUTOCLAIM)",
    ["model"],
    registry=WORKER_REGISTRY,
)
GPU_MEMORY = Gauge(
    "robustdiff_gpu_memory_used_bytes",
    "Bytes allocated by torch on the worker's device (0 on CPU)",
    ["worker"],
    registry=WORKER_REGISTRY,
)

for _reason in FAILURE_REASONS:
    API_FAILURES.labels(reason=_reason)
    WORKER_FAILURES.labels(reason=_reason)
