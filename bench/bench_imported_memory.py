"""Peak memory of a real worker serving an imported 256x256 diffusers folder, by request size.

A private Redis, the API and one worker (separate processes, one torch thread) serve a DDPM folder
in the 256x256 public layout (google/ddpm-celebahq-256, ddpm-ema-church/bedroom/cat-256; random
weights, built by diffusers): ``--width reduced`` (block_out_channels 16..64, the tests' layout) or
``full`` (128..512, 113.7M parameters). Requests of 1, 4 and 16 images (one network evaluation each,
run in that order) go through HTTP; after each the worker's peak resident memory (VmHWM, which only
grows) is read. ``--pixels`` lists ROBUSTDIFF_CPU_MICRO_BATCH_PIXELS values to compare, each with a
fresh worker: e.g. the default (one 256x256 row per network call) against 16 rows per call.

    OMP_NUM_THREADS=1 python bench/bench_imported_memory.py --width full \
        --pixels 65536,1048576 --out bench/results/imported/memory_full.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import Stack, machine

from models.testing import DDPM_256_REDUCED, DDPM_SCHEDULER, diffusers_unet, write_diffusers_folder

WIDTHS: dict[str, dict[str, object]] = {
    "reduced": DDPM_256_REDUCED,
    "full": {**DDPM_256_REDUCED, "block_out_channels": [128, 128, 256, 256, 512, 512], "norm_num_groups": 32},
}


def vm_hwm_mib(pid: int) -> float:
    """The process's peak resident memory so far (Linux VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM")


def run_variant(folder: Path, pixels: int, images: list[int], logs: Path) -> dict[str, Any]:
    stack = Stack(
        Path(f"m={folder}"),
        logs,
        persistent=False,
        ROBUSTDIFF_DEFAULT_MODEL="m",
        ROBUSTDIFF_MAX_IMAGES=str(max(images)),
        ROBUSTDIFF_MAX_BATCH_IMAGES=str(max(images)),
        ROBUSTDIFF_CPU_MICRO_BATCH_PIXELS=str(pixels),
        ROBUSTDIFF_REQUEST_TIMEOUT_S="3600",
    )
    try:
        stack.start_api()
        worker = stack.start_worker()
        stack.wait_ready(1200)
        rows: list[dict[str, Any]] = [{"images": 0, "peak_rss_mib": vm_hwm_mib(worker.pid), "s": 0.0}]
        print(f"pixels {pixels}: ready, peak {rows[0]['peak_rss_mib']} MiB", flush=True)
        with httpx.Client(base_url=stack.base, timeout=60) as c:
            for n in images:
                start = time.perf_counter()
                body = {"model": "m", "num_images": n, "steps": 1, "seeds": 0, "async": True}
                r = c.post("/sample", json=body)
                r.raise_for_status()
                location = r.headers["Location"]
                while (job := c.get(location).json())["status"] not in ("done", "failed", "cancelled"):
                    time.sleep(0.5)
                if job["status"] != "done":
                    raise SystemExit(f"job {job['status']}: {job}")
                row = {"images": n, "peak_rss_mib": vm_hwm_mib(worker.pid), "s": time.perf_counter() - start}
                rows.append(row)
                print(
                    f"pixels {pixels}: {n} images, peak {row['peak_rss_mib']} MiB, {row['s']:.1f} s",
                    flush=True,
                )
        return {
            "micro_batch_pixels": pixels,
            "rows_per_call": max(1, min(16, pixels // (256 * 256))),
            "rows": rows,
        }
    finally:
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", choices=sorted(WIDTHS), default="reduced")
    parser.add_argument("--pixels", default="65536,1048576", help="CPU_MICRO_BATCH_PIXELS values to compare")
    parser.add_argument("--images", default="1,4,16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    images = [int(n) for n in args.images.split(",")]
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_diffusers_folder(
            Path(tmp) / "ddpm256", diffusers_unet(WIDTHS[args.width], sharpen=1.0), DDPM_SCHEDULER
        )
        logs = Path(tmp) / "logs"
        logs.mkdir()
        variants = [run_variant(folder, int(p), images, logs) for p in args.pixels.split(",")]
    result = {
        "benchmark": "bench_imported_memory",
        "width": args.width,
        "config": WIDTHS[args.width],
        **info,
        "loadavg_end": os.getloadavg(),
        "variants": variants,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
