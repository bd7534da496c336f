"""The Kubernetes manifests: schema-valid, consistent with each other, the image and the server."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "manifests").glob("*.yaml"))
SERVER = ROOT / "server.py"
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def load(name):
    (resource,) = yaml.safe_load_all((ROOT / "manifests" / name).read_text())  # one resource per file
    return resource


def pod_spec():
    return load("deployment.yaml")["spec"]["template"]["spec"]


def container():
    (only,) = pod_spec()["containers"]
    return only


def env(name):
    (variable,) = [v for v in container()["env"] if v["name"] == name]
    return variable


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_every_manifest_is_valid_for_kubernetes(version):
    assert MANIFESTS, "with no file kubernetes-validate checks nothing and passes"
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version, *map(str, MANIFESTS)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_pdb_and_deployment_select_the_pods():
    deployment = load("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        load("service.yaml")["spec"]["selector"],
        load("pdb.yaml")["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector and selector.items() <= labels.items()
    assert set(labels) >= {f"app.kubernetes.io/{key}" for key in ("name", "instance", "version", "component", "part-of")}


def test_hpa_scales_the_deployment_on_cpu():
    spec = load("hpa.yaml")["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "podlens"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 8)
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_service_reaches_the_container_port_the_server_defaults_to(monkeypatch):
    if not SERVER.exists():
        pytest.skip("server.py does not exist yet")
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.syspath_prepend(str(ROOT))
    default_port = importlib.import_module("server").parse_args([]).port
    (service_port,) = load("service.yaml")["spec"]["ports"]
    (container_port,) = container()["ports"]
    assert service_port["targetPort"] in (container_port["name"], container_port["containerPort"])
    assert container_port["containerPort"] == default_port
    assert load("deployment.yaml")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(default_port)


def test_requests_equal_limits():
    resources = container()["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "500m", "memory": "512Mi"}


def test_threads_follow_the_cpu_limit():
    field = env("THREADS")["valueFrom"]["resourceFieldRef"]
    assert field == {"resource": "limits.cpu", "divisor": "1"}


def test_security_context_meets_the_restricted_standard():
    assert RESTRICTED_POD.items() <= pod_spec()["securityContext"].items()
    assert RESTRICTED_CONTAINER.items() <= container()["securityContext"].items()
    assert not pod_spec().get("hostNetwork") and not pod_spec().get("hostPID")


def test_grace_period_outlasts_pre_stop_sleep_plus_drain():
    sleep_command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_command[0] == "sleep"
    drain = int(env("DRAIN_TIMEOUT")["value"])
    assert pod_spec()["terminationGracePeriodSeconds"] > int(sleep_command[1]) + drain


def test_probe_and_scrape_paths_answer_200(server):  # server: a ready server.py, from conftest.py
    probes = [container()[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")]
    scrape = load("deployment.yaml")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    for path in [*probes, scrape]:
        assert server.request("GET", path).status == 200, path
