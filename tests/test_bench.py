"""bench/bench.py: a run with tiny durations reports every figure."""

import json
import socket
import subprocess
import sys

import pytest

from conftest import MODEL_DIR, ROOT, coco_photos

FIGURES = {
    "raw_ceiling": ["images_per_s", "ms_per_image", "threads"],
    "throughput": ["rps", "ratio_to_raw", "failures"],
    "latency": ["p50_ms", "p95_ms", "raw_ms_per_image"],
    "overload": ["failures", "oom_kills", "peak_mib", "p50_ms", "p95_ms"],
    "cold_start": ["ready_seconds", "idle_peak_mib"],
    "scale_out": ["rps", "ratio_to_one_pod", "requests_per_pod"],
}


def test_bench_reports_every_figure(tmp_path):
    coco_photos()  # skips without ../shared
    if not (MODEL_DIR / "yolov3-tiny.weights").is_file():
        pytest.skip(f"no model in {MODEL_DIR}: run `make model` (make test does it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench", "--raw-seconds", "2", "--users", "2", "--seconds", "3",
         "--latency-seconds", "3", "--overload-users", "6", "--overload-seconds", "3",
         "--scale-pods", "2", "--scale-users", "4", "--scale-seconds", "3",
         "--port", str(port), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr

    figures = json.loads(out.read_text())
    limited = "cannot create cgroups" not in result.stderr  # else no memory figures, loudly
    for section, keys in FIGURES.items():
        for key in keys:
            unmeasured = not limited and key in ("oom_kills", "peak_mib", "idle_peak_mib")
            assert figures[section][key] is not None or unmeasured, (section, key)
    assert figures["raw_ceiling"]["images_per_s"] > 0 and figures["throughput"]["rps"] > 0
    assert figures["overload"]["failures"] == 0 and figures["cold_start"]["ready_seconds"] > 0
    assert len(figures["scale_out"]["requests_per_pod"]) == 2
    assert set(figures["targets_met"]) == {"2 throughput", "3 latency, 1 user", "4 overload",
                                           "5 cold start", "6 scale-out"}
    for row in ("1 raw ceiling", "2 throughput", "3 latency", "4 overload", "5 cold start", "6 scale-out"):
        assert row in result.stdout
    assert (tmp_path / "runs" / "overload.html").is_file()
