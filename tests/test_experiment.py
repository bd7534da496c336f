"""The experiment's tooling: local pods, the locustfile's failure rules, a smoke run."""

import csv
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import MODEL_DIR, ROOT, coco_photos
from experiment.load import run_locust
from experiment.pods import Pods


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def model():
    if not (MODEL_DIR / "yolov3-tiny.weights").is_file():
        pytest.skip(f"no model in {MODEL_DIR}: run `make model` (make test does it)")


def test_pods_share_a_port_within_limits_and_restart_when_killed(model, tmp_path):
    with Pods(2, port=free_port(), log_dir=tmp_path) as pods:
        if any(pod.cgroup is None for pod in pods.pods):
            pytest.skip("cgroups are not writable here: pods run without limits")
        cgroup_dirs = [d for pod in pods.pods for d in pod.cgroup.dirs]
        first = pods.pods[0]
        if first.cgroup.version == 1:
            cpu_dir, memory_dir = first.cgroup.dirs
            assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "50000"
            assert (memory_dir / "memory.limit_in_bytes").read_text().strip() == str(512 << 20)
        assert str(first.process.pid) in (first.cgroup.dirs[-1] / "cgroup.procs").read_text().split()

        old_pid = first.process.pid
        pods.kill(0)
        first.process.wait()
        pods.wait_ready(timeout=60)  # the supervisor restarted it
        stats = pods.stats()
        assert stats[0]["restarts"] == 1 and stats[0]["pid"] != old_pid and stats[0]["alive"]
        assert all(s["peak_mib"] > 50 and s["oom_kills"] == 0 for s in stats)
        pids = [pod.process.pid for pod in pods.pods]
    assert not any(d.exists() for d in cgroup_dirs)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class StubHandler(BaseHTTPRequestHandler):
    """Answers detections in one of several wrong (or right) ways."""

    protocol_version = "HTTP/1.1"
    mode = "right"

    def do_POST(self):
        request_id = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["id"]
        obj = {"label": "dog", "accuracy": 0.9, "rectangle": {"height": 1, "left": 2, "top": 3, "width": 4}}
        status, body = 200, {"id": request_id, "objects": [obj]}
        if self.mode == "another id":
            body["id"] = "someone else"
        elif self.mode == "broken object":
            obj["rectangle"]["left"] = 2.5
        elif self.mode == "status 503":
            status = 503
        elif self.mode == "slower than":
            threading.Event().wait(1.2)
        payload = b"<html>oops" if self.mode == "not JSON" else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode", ["right", "another id", "broken object", "status 503", "not JSON",
                                  "slower than"])
def test_locustfile_fails_wrong_answers(mode, tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8 not decoded by the stub")
    handler = type("Handler", (StubHandler,), {"mode": mode})
    stub = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        figures = run_locust(f"http://127.0.0.1:{stub.server_address[1]}", 2, 2, 3, tmp_path / "run",
                             ["--images", tmp_path, "--timeout", 1])
    finally:
        stub.shutdown()
    assert figures["requests"] > 0
    with open(tmp_path / "run_failures.csv", newline="") as f:
        errors = [row["Error"] for row in csv.DictReader(f)]
    if mode == "right":
        assert figures["failures"] == 0, errors
    else:
        assert figures["failures"] == figures["requests"]
        assert errors and all(mode in error for error in errors), errors


def test_experiment_smoke_run_writes_every_output(model, tmp_path):
    coco_photos()  # skips without ../shared
    out = tmp_path / "results"
    # A 1 s timeout makes one pod fail at a handful of users within seconds.
    result = subprocess.run(
        [sys.executable, "-m", "experiment.run", "--pods", "1", "--step-users", "2", "--step-seconds", "5",
         "--max-users", "8", "--timeout", "1", "--hold", "5", "--port", str(free_port()), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pods 1 | ramp: 2 users held 5 s" in result.stdout
    assert "pods 1 | hold " in result.stdout

    with open(out / "results.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["pods"] == "1" and 1 <= int(row["max_users"]) <= 8
    assert float(row["avg_ms"]) > 0 and float(row["p95_ms"]) > 0 and float(row["rps"]) > 0
    assert int(row["requests"]) > 0 and int(row["failures"]) == 0
    assert int(row["requests_per_pod"]) >= int(row["requests"])  # the pod also served the spawn phase
    md = (out / "results.md").read_text()
    assert "| 1 | " + row["max_users"] + " |" in md and "3134.74" in md
    for png in ("max_users.png", "response_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    htmls = sorted(p.name for p in out.glob("*.html"))
    assert "pods1-ramp.html" in htmls and any(name.startswith("pods1-hold") for name in htmls)
    assert all("<html" in (out / name).read_text().lower() for name in htmls)
