"""openapi.yaml is the contract: the server serves it, its real answers match it, and fuzzing from it finds no 5xx."""

import json

import jsonschema
import referencing
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance, unsupported_method)

from conftest import ROOT, json_body, photo

SPEC_PATH = ROOT / "openapi.yaml"
SPEC = yaml.safe_load(SPEC_PATH.read_text())
REGISTRY = referencing.Registry().with_resource(
    "urn:spec", referencing.Resource.from_contents(SPEC, referencing.jsonschema.DRAFT202012))
API = "/api/object_detection"


def validate(method, path, answer):
    """Check one real answer against the spec: a documented status, content type, headers and body."""
    operation = SPEC["paths"][path][method.lower()]
    assert str(answer.status) in operation["responses"], f"{method} {path}: {answer.status} is not documented"
    pointer = f"#/paths/{path.replace('/', '~1')}/{method.lower()}/responses/{answer.status}"
    response = operation["responses"][str(answer.status)]
    if "$ref" in response:  # a shared response in components
        pointer = response["$ref"]
        response = REGISTRY.resolver("urn:spec").lookup(pointer).contents
    for name, header in response.get("headers", {}).items():
        assert name in answer.headers or not header.get("required"), f"{name} missing"
    media_type = answer.headers["Content-Type"].split(";")[0]
    assert media_type in response["content"], f"{media_type} is not documented for {answer.status}"
    if media_type == "application/json":
        schema = {"$ref": f"urn:spec{pointer}/content/application~1json/schema"}
        jsonschema.Draft202012Validator(schema, registry=REGISTRY).validate(json.loads(answer.body))


def test_the_server_serves_its_spec(server):
    answer = server.request("GET", "/openapi.yaml")
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/yaml"
    assert yaml.safe_load(answer.body) == SPEC
    jsonschema.Draft202012Validator.check_schema(SPEC["components"]["schemas"]["DetectionAnswer"])


def test_real_answers_match_the_spec(server, start_server):
    dog = photo("dog.jpg").read_bytes()
    json_headers = {"Content-Type": "application/json"}
    found = server.detect(dog)
    assert found.json()["objects"], "the dog photo should give objects to validate"
    cases = [
        ("POST", API, found),
        ("POST", API, server.request("POST", API + "?id=raw", dog, {"Content-Type": "image/jpeg"})),
        ("POST", API, server.request("POST", API + "?annotate=1", json_body(dog), json_headers)),
        ("POST", API, server.request("POST", API, b"{", json_headers)),
        ("POST", API, server.request("POST", API, b"id=1", {"Content-Type": "text/plain"})),
        ("POST", API, server.request("POST", API, json_body(b"GIF89a" + bytes(20)), json_headers)),
        ("POST", API, server.request("POST", API, None, {"Content-Length": str(1 << 30)})),
        ("GET", "/api/model", server.request("GET", "/api/model")),
        ("GET", "/healthz", server.request("GET", "/healthz")),
        ("GET", "/readyz", server.request("GET", "/readyz")),
        ("GET", "/metrics", server.request("GET", "/metrics")),
        ("GET", "/", server.request("GET", "/")),
        ("GET", "/static/{name}", server.request("GET", "/static/app.js")),
        ("GET", "/static/{name}", server.request("GET", "/static/nope.js")),
        ("GET", "/openapi.yaml", server.request("GET", "/openapi.yaml")),
    ]
    guarded = start_server(env={"API_TOKEN": "s3cret"})
    cases.append(("POST", API, guarded.detect(dog)))
    for method, path, answer in cases:
        validate(method, path, answer)
    assert {answer.status for _, _, answer in cases} >= {200, 400, 401, 404, 413, 415}


def test_the_api_token_guards_the_api_only(start_server):
    guarded = start_server("--api-token", "s3cret")
    dog = photo("dog.jpg").read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        refused = guarded.request("GET", "/api/model", headers=headers)
        assert refused.status == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    body, headers = json_body(dog), {"Content-Type": "application/json", "Authorization": "Bearer s3cret"}
    assert guarded.request("POST", API, body, headers).status == 200
    for path in ("/", "/healthz", "/readyz", "/metrics", "/openapi.yaml"):
        assert guarded.request("GET", path).status == 200, path
    assert "s3cret" not in "\n".join(guarded.log_lines)


# --- fuzzing: schemathesis generates valid and invalid requests from the spec

schema = schemathesis.openapi.from_path(SPEC_PATH)
schema.config.generation.update(modes=["positive", "negative"])
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection, unsupported_method]


@schema.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzzing_finds_no_server_error(case, server):
    case.call_and_validate(base_url=f"http://127.0.0.1:{server.port}", checks=CHECKS, timeout=30)


def test_still_serving_a_photo_after_fuzzing(server):
    answer = server.detect(photo("dog.jpg").read_bytes())
    assert answer.status == 200 and "dog" in {o["label"] for o in answer.json()["objects"]}
    assert "Traceback" not in "\n".join(server.log_lines)
