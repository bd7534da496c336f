"""Shared test fixtures: a real server.py process on an ephemeral port, and the photos."""

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "images"
DARKNET = IMAGES / "darknet"
COCO128 = IMAGES / "coco128"
MODEL_DIR = Path(os.environ.get("MODEL_DIR", ROOT / "model"))
if not MODEL_DIR.is_absolute():
    MODEL_DIR = ROOT / MODEL_DIR


def photo(name):
    """A photo from ../shared/images/darknet, or a skip that says why."""
    path = DARKNET / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the tests that need photos read them from ../shared")
    return path


def coco_photos():
    if not COCO128.is_dir():
        pytest.skip(f"{COCO128} is absent: the tests that need photos read them from ../shared")
    return sorted(COCO128.glob("*.jpg"))


def json_body(image_bytes, request_id="test", **fields):
    return json.dumps({"id": request_id, "image": base64.b64encode(image_bytes).decode(), **fields})


class Response:
    def __init__(self, raw):
        self.status = raw.status
        self.headers = raw.headers
        self.body = raw.read()

    def json(self):
        return json.loads(self.body)


class ServerProcess:
    """server.py in a subprocess; its stderr is collected in `log_lines`."""

    def __init__(self, *args, env=None):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), "--port", "0", "--model-dir", str(MODEL_DIR), *args],
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.log_lines = []
        self.port = None
        listening = threading.Event()
        threading.Thread(target=self._collect_log, args=(listening,), daemon=True).start()
        if not listening.wait(30):
            self.stop()
            raise RuntimeError("server.py did not start:\n" + "\n".join(self.log_lines))

    def _collect_log(self, listening):
        for line in self.process.stderr:
            self.log_lines.append(line.rstrip("\n"))
            found = re.search(r"listening on http://[^:]+:(\d+)/", line)
            if found:
                self.port = int(found.group(1))
                listening.set()

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("server.py exited:\n" + "\n".join(self.log_lines))
            if self.request("GET", "/readyz").status == 200:
                return self
            time.sleep(0.05)
        raise RuntimeError("server.py never became ready")

    def connection(self, timeout=60):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, connection=None):
        conn = connection or self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            return Response(conn.getresponse())
        finally:
            if connection is None:
                conn.close()

    def detect(self, image_bytes, request_id="test", path="/api/object_detection", **fields):
        return self.request("POST", path, json_body(image_bytes, request_id, **fields),
                            {"Content-Type": "application/json"})

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="session")
def server():
    """One ready server for the whole session, with default settings."""
    if not (MODEL_DIR / "yolov3-tiny.weights").is_file():
        pytest.skip(f"no model in {MODEL_DIR}: run `make model` (make test does it)")
    process = ServerProcess().wait_ready()
    yield process
    process.stop()


@pytest.fixture
def start_server():
    """Start servers with their own flags; each is stopped after the test."""
    started = []

    def start(*args, env=None, ready=True):
        process = ServerProcess(*args, env=env)
        started.append(process)
        return process.wait_ready() if ready else process

    yield start
    for process in started:
        process.stop()
