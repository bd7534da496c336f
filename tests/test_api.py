"""The HTTP contract: accepted body forms, probes, and every error row, each followed by a good request."""

import base64
import json
import socket
import struct
import zlib

import pytest

from conftest import photo

API = "/api/object_detection"


@pytest.fixture
def dog():
    return photo("dog.jpg").read_bytes()


def labels(response):
    assert response.status == 200, response.body
    return {o["label"] for o in response.json()["objects"]}


def png_declaring(width, height):
    """A tiny PNG whose header claims a huge size: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def jpeg_declaring(dog, width, height):
    """dog.jpg with its frame header rewritten to claim another size."""
    data = bytearray(dog)
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    data[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# --- accepted forms


def test_json_body(server, dog):
    answer = server.detect(dog, request_id="plain")
    assert answer.json()["id"] == "plain"
    assert "dog" in labels(answer)


def test_double_encoded_json_body(server, dog):
    """The course client posts json=json.dumps(data): a JSON string holding the JSON."""
    body = json.dumps(json.dumps({"id": "twice", "image": base64.b64encode(dog).decode()}))
    answer = server.request("POST", API, body, {"Content-Type": "application/json"})
    assert answer.json()["id"] == "twice"
    assert "dog" in labels(answer)


def test_data_uri_prefix(server, dog):
    body = json.dumps({"id": "uri", "image": "data:image/jpeg;base64," + base64.b64encode(dog).decode()})
    assert "dog" in labels(server.request("POST", API, body, {"Content-Type": "application/json"}))


def test_wrapped_base64_as_from_the_base64_command(server, dog):
    encoded = base64.encodebytes(dog).decode()  # 76-character lines
    body = json.dumps({"id": "wrapped", "image": encoded})
    assert "dog" in labels(server.request("POST", API, body, {"Content-Type": "application/json"}))


def test_raw_jpeg_body_with_id_from_query(server, dog):
    answer = server.request("POST", API + "?id=raw-1", dog, {"Content-Type": "image/jpeg"})
    assert answer.json()["id"] == "raw-1"
    assert "dog" in labels(answer)


def test_raw_body_without_id_gets_a_uuid(server, dog):
    answer = server.request("POST", API, dog, {"Content-Type": "image/jpeg"})
    assert len(answer.json()["id"]) == 36
    assert "dog" in labels(answer)


def test_png_body(server, dog):
    import cv2
    import numpy as np
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(dog, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    assert "dog" in labels(server.request("POST", API, png, {"Content-Type": "image/png"}))


# --- probes and model


def test_probes_and_model(server):
    assert server.request("GET", "/healthz").status == 200
    assert server.request("GET", "/readyz").json() == {"status": "ready"}
    model = server.request("GET", "/api/model").json()
    assert model["model"] == "yolov3-tiny"
    assert model["input_size"] == [416, 416]
    assert (model["confidence"], model["nms"]) == (0.3, 0.45)
    assert len(model["labels"]) == 80 and model["labels"][16] == "dog"
    assert model["threads"] >= 1


def test_head_has_headers_and_no_body(server):
    answer = server.request("HEAD", "/healthz")
    assert answer.status == 200 and answer.body == b""
    assert int(answer.headers["Content-Length"]) > 0


def test_keep_alive_serves_many_requests_on_one_connection(server, dog):
    conn = server.connection()
    try:
        for number in range(3):
            answer = server.request("POST", API + f"?id=k{number}", dog, {"Content-Type": "image/jpeg"},
                                    connection=conn)
            assert answer.json()["id"] == f"k{number}"
            assert answer.headers["Connection"] != "close"
        assert server.request("GET", "/nope", connection=conn).status == 404
        assert server.request("GET", "/healthz", connection=conn).status == 200
    finally:
        conn.close()


# --- errors: each a clear JSON message with the right status, and the server keeps serving

def b64(data):
    return base64.b64encode(data).decode()


ERRORS = [
    # (why, method, path, body, headers, status)
    ("bad JSON", "POST", API, b"{not json", {"Content-Type": "application/json"}, 400),
    ("JSON array", "POST", API, b"[1, 2]", {"Content-Type": "application/json"}, 400),
    ("deep JSON", "POST", API, b"[" * 100000, {"Content-Type": "application/json"}, 400),
    ("missing id", "POST", API, json.dumps({"image": "AAAA"}), {}, 400),
    ("missing image", "POST", API, json.dumps({"id": "x"}), {}, 400),
    ("number id", "POST", API, json.dumps({"id": 7, "image": "AAAA"}), {}, 400),
    ("id too long", "POST", API, json.dumps({"id": "x" * 5000, "image": "AAAA"}), {}, 400),
    ("bad base64", "POST", API, json.dumps({"id": "x", "image": "not*base64!"}), {}, 400),
    ("not an image", "POST", API, json.dumps({"id": "x", "image": b64(b"hello world, not a photo")}), {}, 400),
    ("truncated JPEG", "POST", API, json.dumps({"id": "x", "image": b64(b"\xff\xd8\xff\xe0\x00\x10JFIF")}), {}, 400),
    ("confidence over 1", "POST", API, json.dumps({"id": "x", "image": "AAAA", "confidence": 2}), {}, 400),
    ("nms a string", "POST", API, json.dumps({"id": "x", "image": "AAAA", "nms": "high"}), {}, 400),
    ("GIF", "POST", API, json.dumps({"id": "x", "image": b64(b"GIF89a" + bytes(20))}), {}, 415),
    ("form content type", "POST", API, b"id=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("unknown path", "GET", "/nope", None, {}, 404),
    ("GET on the API", "GET", API, None, {}, 405),
    ("POST on a probe", "POST", "/healthz", b"{}", {}, 405),
    ("body over the limit", "POST", API, None, {"Content-Length": str(17 << 20)}, 413),
    ("PNG bomb", "POST", API, json.dumps({"id": "x", "image": b64(png_declaring(30000, 30000))}), {}, 413),
]


@pytest.mark.parametrize("why, method, path, body, headers, status", ERRORS, ids=[e[0] for e in ERRORS])
def test_error_then_still_serving(server, dog, why, method, path, body, headers, status):
    answer = raw_request(server, method, path, body, headers)
    assert answer[0] == status, answer
    assert answer[1]["content-type"] == "application/json"
    assert isinstance(json.loads(answer[2])["error"], str) and json.loads(answer[2])["error"]
    if status == 405:
        assert "allow" in answer[1]
    assert "dog" in labels(server.detect(dog))


def test_missing_content_length_is_411(server, dog):
    status, headers, body = raw_request(server, "POST", API, None, {"Content-Type": "application/json"})
    assert status == 411 and "Content-Length" in json.loads(body)["error"]
    assert "dog" in labels(server.detect(dog))


def test_jpeg_bomb_is_refused_from_its_header(server, dog):
    answer = server.detect(jpeg_declaring(dog, 30000, 30000))
    assert answer.status == 413 and "30000x30000" in answer.json()["error"]
    assert "dog" in labels(server.detect(dog))


def test_malformed_request_line_gets_json(server, dog):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 400") and '"error"' in reply
    assert "dog" in labels(server.detect(dog))


def raw_request(server, method, path, body, headers):
    """A request over a bare socket, so Content-Length can be absent or false."""
    if isinstance(body, str):
        body = body.encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close"]
    if body is not None and "Content-Length" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    if method == "POST" and "Content-Type" not in headers:
        headers = {**headers, "Content-Type": "application/json"}
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in header_lines}
    parsed["raw"] = head.decode()
    return int(status_line.split()[1]), parsed, payload
