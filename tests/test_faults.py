"""Faults: slow and idle clients, clients that leave, overload, and pods killed or stopped under load."""

import collections
import concurrent.futures
import http.client
import socket
import threading
import time

import cv2
import numpy as np
import pytest

from conftest import json_body, photo
from experiment.pods import Pods
from test_lifecycle import wait_for_metric

API = "/api/object_detection"
JSON = {"Content-Type": "application/json"}


def process_status(pid, field):
    """A number from /proc/<pid>/status, e.g. Threads or VmRSS (kB)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def wait_until(condition, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def detect_seconds(process, image):
    started = time.monotonic()
    answer = process.detect(image)
    assert answer.status == 200, answer.body
    return time.monotonic() - started


# --- slow and idle clients


def test_a_header_trickle_is_cut_off_after_the_timeout(start_server):
    """A byte a second: each read is in time, so only a deadline for the whole head stops it."""
    process = start_server("--timeout", "2")
    dog = photo("dog.jpg").read_bytes()
    with socket.create_connection(("127.0.0.1", process.port)) as trickle:
        trickle.settimeout(1)
        started, hung_up = time.monotonic(), None
        for byte in b"GET /healthz HTTP/1.1\r\n":  # 23 s, were it never cut off
            try:
                trickle.sendall(bytes([byte]))
                if trickle.recv(100) == b"":
                    hung_up = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            except ConnectionError:
                hung_up = time.monotonic() - started
                break
        assert hung_up is not None and hung_up < 3.5, f"the server did not hang up ({hung_up})"
        print(f"header trickle of a byte a second cut off after {hung_up:.2f} s (--timeout 2)")
    assert detect_seconds(process, dog) < 5


def test_idle_connections_time_out_and_others_are_served_meanwhile(start_server):
    process = start_server("--timeout", "4")
    dog = photo("dog.jpg").read_bytes()
    baseline = sorted(detect_seconds(process, dog) for _ in range(3))[1]
    threads = process_status(process.process.pid, "Threads")
    idle = [socket.create_connection(("127.0.0.1", process.port)) for _ in range(500)]
    try:
        wait_for_metric(process, "podlens_in_flight", lambda value: value <= 1)
        assert process_status(process.process.pid, "Threads") >= threads + 400
        during = sorted(detect_seconds(process, dog) for _ in range(3))[1]
        assert during < baseline * 2 + 0.2, (baseline, during)
        for sock in idle:  # every one is hung up by the server after --timeout
            sock.settimeout(8)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    assert wait_until(lambda: process_status(process.process.pid, "Threads") <= threads + 2, 5)
    print(f"detection latency {baseline * 1000:.0f} ms alone, {during * 1000:.0f} ms beside 500 idle connections")


# --- clients that leave, and too many clients


def post_without_reading(port, body):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {API} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_clients_that_hang_up_while_queued_leave_the_queue_and_leak_nothing(start_server):
    process = start_server()
    pid = process.process.pid
    dog = photo("dog.jpg").read_bytes()
    # A big body (1.5 MB of JSON), so that keeping even some of them would show.
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(dog, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.uint16))[1]

    def clients_come_and_go(name):
        body = json_body(png.tobytes(), name).encode()
        clients = [post_without_reading(process.port, body) for _ in range(30)]
        wait_for_metric(process, "podlens_waiting", lambda value: value >= 20)
        for sock in clients:
            sock.close()
        wait_for_metric(process, "podlens_waiting", lambda value: value == 0, timeout=5)

    # The first rounds grow the heap (malloc keeps freed memory for reuse), then it stays flat.
    for _ in range(3):
        clients_come_and_go("warm")
    threads, rss = process_status(pid, "Threads"), process_status(pid, "VmRSS")
    left_before = sum("hung up while waiting" in line for line in process.log_lines)
    for _ in range(3):  # a leak grows with every round
        clients_come_and_go("gone")
    served = sum(" 200 " in line and "id=gone" in line for line in process.log_lines)
    left = sum("hung up while waiting" in line for line in process.log_lines) - left_before
    assert wait_until(lambda: process_status(pid, "Threads") <= threads, 5), process_status(pid, "Threads")
    grown = (process_status(pid, "VmRSS") - rss) / 1024
    print(f"90 clients hung up while queued: {left} left the queue, {served} were served; "
          f"threads {threads} -> {process_status(pid, 'Threads')}, RSS grew {grown:.1f} MiB over the last 90")
    # Waiters look every second and when their turn comes; only those already in the model run.
    assert left >= 75 and served <= 6, (left, served)
    assert grown < 30, f"RSS grew by {grown:.0f} MiB; the last 90 bodies were 135 MB"
    assert detect_seconds(process, dog) < 5


def test_a_full_queue_answers_503_at_once(start_server):
    process = start_server("--max-waiting", "3")
    dog = photo("dog.jpg").read_bytes()

    def timed_detect(n):
        started = time.monotonic()
        answer = process.detect(dog, f"q{n}")
        return answer, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(timed_detect, range(16)))
    refused = [(a, t) for a, t in results if a.status == 503]
    assert {a.status for a, _ in results} == {200, 503}
    assert len(refused) >= 16 - 2 - 3 - 4  # two in the model, three waiting; some finish before others arrive
    assert all(a.headers["Retry-After"] and "waiting" in a.json()["error"] and t < 2 for a, t in refused)
    assert detect_seconds(process, dog) < 5


# --- pods: several server processes on one port (experiment/pods.py), one killed or stopped under load

# With 16 kept-alive connections, the odds that the kernel puts them all on one pod are 2 in 65536.
CLIENTS = 16


class Load:
    """Clients that each keep one keep-alive connection and post a photo in a loop.

    Like requests or a browser, a client reconnects after a `Connection:
    close` answer, and never retries a failed request: every failure counts.
    """

    def __init__(self, port, body, clients):
        self.port, self.body = port, body
        self.statuses = collections.Counter()
        self.failures = collections.Counter()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)

    def client(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stopping.is_set():
            try:
                conn.request("POST", API, self.body, JSON)  # reconnects once the last answer said close
                answer = conn.getresponse()
                answer.read()
                self.statuses[answer.status] += 1
                if answer.status != 200:
                    self.failures[f"HTTP {answer.status}"] += 1
            except (OSError, http.client.HTTPException) as error:
                self.failures[type(error).__name__] += 1
                conn.close()
                time.sleep(0.1)


@pytest.fixture
def two_pods(tmp_path):
    """Two pods of one CPU each (not started yet), and the free port they will share."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return Pods(2, port=port, log_dir=tmp_path, cpu=1, ready_timeout=60), port


def served_since_start(pod):
    return sum('"POST /api/object_detection' in line and " 200 " in line for line in pod.log_lines(since_start=True))


def test_kill_9_fails_only_the_killed_pods_requests_and_it_rejoins(two_pods):
    group, port = two_pods
    body = json_body(photo("dog.jpg").read_bytes())
    with group, Load(port, body, clients=CLIENTS) as load:
        assert wait_until(lambda: all(served_since_start(pod) >= 3 for pod in group.pods), 30)
        group.kill(0)  # SIGKILL, as an OOM kill or a crash would
        assert wait_until(lambda: group.pods[0].restarts == 1, 5), "the supervisor did not restart the pod"
        group.wait_ready(60)
        # Kept-alive connections stay where they are: only new ones reach the restarted pod.
        with Load(port, body, clients=CLIENTS) as newcomers:
            assert wait_until(lambda: served_since_start(group.pods[0]) >= 3, 30), "the restarted pod serves nothing"
    failed = sum(load.failures.values())
    print(f"kill -9 of one of two pods under {CLIENTS} clients: {sum(load.statuses.values())} answered, "
          f"{failed} failed {dict(load.failures)}; {CLIENTS} new clients then got "
          f"{served_since_start(group.pods[0])} answers from the restarted pod")
    assert 0 < failed <= CLIENTS, load.failures  # at most the requests then on the killed pod: one per client
    assert not newcomers.failures


def test_sigterm_of_a_pod_under_load_fails_no_request(two_pods):
    group, port = two_pods
    body = json_body(photo("dog.jpg").read_bytes())
    with group, Load(port, body, clients=CLIENTS) as load:
        assert wait_until(lambda: all(served_since_start(pod) >= 3 for pod in group.pods), 30)
        group.stop(0)  # SIGTERM, as scaling down or a rolling update does; waits for the exit
        assert group.pods[0].process.returncode == 0
        after_stop = sum(load.statuses.values())
        assert wait_until(lambda: sum(load.statuses.values()) > after_stop + 10, 30)
    drained = any("stopped (drained)" in line for line in group.pods[0].log_lines())
    print(f"SIGTERM of one of two pods under {CLIENTS} clients: {sum(load.statuses.values())} answered, "
          f"failures {dict(load.failures)}, drained={drained}")
    assert not load.failures and drained
