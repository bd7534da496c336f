"""Start-up, limits that protect the process, and the graceful drain on SIGTERM."""

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, ServerProcess, photo
from experiment.pods import Cgroup

API = "/api/object_detection"


def test_not_ready_until_model_loaded(start_server):
    process = start_server(ready=False)
    assert process.request("GET", "/healthz").status == 200
    early = process.request("GET", "/readyz")
    if early.status == 200:
        pytest.skip("the model loaded before the first probe; nothing to observe")
    assert early.status == 503 and early.headers["Retry-After"]
    refused = process.request("POST", API + "?id=early", b"x", {"Content-Type": "image/jpeg"})
    assert refused.status == 503 and refused.headers["Retry-After"]
    process.wait_ready()


def test_missing_model_exits_with_a_clear_message(tmp_path):
    process = ServerProcess("--model-dir", str(tmp_path))
    assert process.process.wait(30) == 1
    time.sleep(0.2)
    assert any("cannot load the model" in line and "make model" in line for line in process.log_lines)


def test_connection_cap_answers_503(start_server):
    process = start_server("--max-connections", "2")
    held = [process.connection() for _ in range(2)]
    for conn in held:
        assert process.request("GET", "/healthz", connection=conn).status == 200
    refused = process.request("GET", "/healthz")
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    held.pop().close()
    time.sleep(0.2)
    assert process.request("GET", "/healthz").status == 200
    held[0].close()


def test_byte_budget_answers_503(start_server):
    process = start_server("--max-buffered-bytes", "100000")
    dog = photo("dog.jpg").read_bytes()
    answer = process.detect(dog)
    assert answer.status == 503 and "retry" in answer.json()["error"]
    assert process.detect(dog[:40000][:0] or b"", "small").status == 400  # still serving


def test_silent_and_trickling_clients_time_out(start_server):
    process = start_server("--timeout", "1")
    with socket.create_connection(("127.0.0.1", process.port)) as silent:
        silent.settimeout(5)
        started = time.monotonic()
        assert silent.recv(100) == b""  # the server hung up
        assert time.monotonic() - started < 3
    with socket.create_connection(("127.0.0.1", process.port)) as trickle:
        trickle.sendall(b"POST /api/object_detection HTTP/1.1\r\nContent-Type: image/jpeg\r\n"
                        b"Content-Length: 1000\r\n\r\n")
        trickle.settimeout(10)
        for _ in range(3):  # a byte every half second: each read is in time, the whole body is not
            trickle.sendall(b"x")
            time.sleep(0.5)
        assert trickle.recv(200).startswith(b"HTTP/1.1 408")
    assert process.request("GET", "/healthz").status == 200


def test_sigterm_drains_in_flight_requests(start_server):
    process = start_server()
    dog = photo("dog.jpg").read_bytes()
    idle = process.connection()
    assert process.request("GET", "/healthz", connection=idle).status == 200
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = [pool.submit(process.detect, dog, f"drain{n}") for n in range(16)]
        wait_for_metric(process, "podlens_waiting", lambda value: value >= 4)
        process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (readiness := process.request("GET", "/readyz", connection=idle)).status == 200:
            assert time.monotonic() < deadline, "readiness never turned 503"
        assert readiness.status == 503 and readiness.json()["error"] == "draining"
        assert [a.result().status for a in answers] == [200] * 16
    assert process.process.wait(15) == 0
    assert any("stopped (drained)" in line for line in process.log_lines)


def wait_for_metric(process, name, condition, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = process.request("GET", "/metrics").body.decode()
        value = float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
        if condition(value):
            return
        time.sleep(0.01)
    raise AssertionError(f"{name} never met the condition")


def test_threads_follow_the_cgroup_cpu_quota():
    cgroup = Cgroup.create(f"podlens-test-{os.getpid()}", cpu=0.5, memory_mib=512)
    if cgroup is None:
        pytest.skip("no writable cgroup (v1 or v2) here to set a CPU quota in")
    try:
        command = cgroup.command([sys.executable, "-c", "import server; print(server.cpu_limit())"])
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert out.stdout.strip() == "1", out.stderr
    finally:
        cgroup.remove()


def test_threads_flag_overrides(start_server):
    process = start_server(env={"THREADS": "3"})
    assert process.request("GET", "/api/model").json()["threads"] == 3
