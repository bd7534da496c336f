"""Hostile and unusual inputs (beyond tests/test_api.py): each gets a clear answer, never a crash,
and a good request still works afterwards. The last test reads the server's log and error bodies."""

import base64
import io
import json
import os
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, photo
from test_api import jpeg_declaring, png_declaring

API = "/api/object_detection"
JSON = {"Content-Type": "application/json"}
ERROR_BODIES = []  # every error answer of this module, for the last test


@pytest.fixture(scope="module")
def dog():
    return photo("dog.jpg").read_bytes()


@pytest.fixture(scope="module")
def pixels(dog):
    return cv2.imdecode(np.frombuffer(dog, np.uint8), cv2.IMREAD_COLOR)


def post(server, body, headers=JSON, path=API):
    answer = server.request("POST", path, body, headers)
    if answer.status != 200:
        ERROR_BODIES.append(answer.body.decode(errors="replace"))
    return answer


def detect(server, image, **fields):
    body = json.dumps({"id": "hostile", "image": base64.b64encode(image).decode(), **fields})
    return post(server, body)


def labels(answer):
    assert answer.status == 200, answer.body
    return [o["label"] for o in answer.json()["objects"]]


def still_serving(server, dog):
    assert "dog" in labels(detect(server, dog))


def encode(ext, image, *params):
    return cv2.imencode(ext, image, list(params))[1].tobytes()


def pillow(dog, mode, fmt):
    out = io.BytesIO()
    Image.open(io.BytesIO(dog)).convert(mode).save(out, fmt)
    return out.getvalue()


# --- broken and foreign images: a 4xx that says what is wrong


def broken_images(dog, pixels):
    png = encode(".png", pixels)
    return {
        "zero-byte": (b"", 400),
        "truncated JPEG": (dog[:len(dog) // 2], 400),
        "JPEG header only": (dog[:600], 400),
        "truncated PNG": (png[:len(png) // 3], 400),
        "PNG signature only": (png[:8], 400),
        "PNG with a bad IHDR checksum": (png[:29] + b"\0\0\0\0" + png[33:], 400),
        "random bytes": (os.urandom(20000), 400),
        "random bytes after a JPEG marker": (b"\xff\xd8\xff" + os.urandom(20000), 400),
        "GIF": (pillow(dog, "P", "GIF"), 415),
        "WebP": (encode(".webp", pixels), 415),
        "TIFF": (encode(".tiff", pixels), 415),
        "BMP": (encode(".bmp", pixels), 415),
    }


BROKEN = ["zero-byte", "truncated JPEG", "JPEG header only", "truncated PNG", "PNG signature only",
          "PNG with a bad IHDR checksum", "random bytes", "random bytes after a JPEG marker",
          "GIF", "WebP", "TIFF", "BMP"]


@pytest.mark.parametrize("name", BROKEN)
def test_broken_or_foreign_image_is_a_clear_4xx(server, dog, pixels, name):
    data, status = broken_images(dog, pixels)[name]
    for answer in (detect(server, data), post(server, data, {"Content-Type": "image/jpeg"})):
        assert answer.status == status, (name, answer.body)
        assert answer.json()["error"]
    if status == 415:
        assert name.split()[0] in answer.json()["error"]
    still_serving(server, dog)


def test_corrupt_jpeg_data_is_decoded_or_refused(server, dog):
    """Garbage in the middle of the entropy-coded data: libjpeg decodes what it can."""
    corrupt = dog[:20000] + os.urandom(5000) + dog[25000:]
    assert detect(server, corrupt).status in (200, 400)
    still_serving(server, dog)


def test_decompression_bombs_are_refused_before_decoding_and_memory_stays_flat(server, dog):
    bombs = [png_declaring(30000, 30000), jpeg_declaring(dog, 30000, 30000), jpeg_declaring(dog, 65535, 65535)]
    detect(server, bombs[0])  # the first answer settles buffers and metric series
    before = rss_mib(server.process.pid)
    for bomb in bombs * 10:
        answer = detect(server, bomb)
        assert answer.status == 413 and "pixels" in answer.json()["error"]
    after = rss_mib(server.process.pid)
    # Decoding one of these would take 2.7 GB (30000 x 30000 x 3 bytes).
    assert after - before < 20, f"RSS grew from {before:.0f} to {after:.0f} MiB"
    print(f"server RSS {before:.1f} -> {after:.1f} MiB over 30 bombs")
    still_serving(server, dog)


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# --- unusual but valid images: the dog is still found


def unusual_images(dog, pixels):
    return {
        "greyscale PNG": encode(".png", cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)),
        "16-bit PNG": encode(".png", pixels.astype(np.uint16) * 257),
        "alpha PNG": encode(".png", cv2.cvtColor(pixels, cv2.COLOR_BGR2BGRA)),
        "greyscale JPEG": encode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)),
        "progressive JPEG": encode(".jpg", pixels, cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "CMYK JPEG": pillow(dog, "CMYK", "JPEG"),
    }


@pytest.mark.parametrize("name", ["greyscale PNG", "16-bit PNG", "alpha PNG", "greyscale JPEG",
                                  "progressive JPEG", "CMYK JPEG"])
def test_unusual_image_still_finds_the_dog(server, dog, pixels, name):
    data = unusual_images(dog, pixels)[name]
    assert "dog" in labels(detect(server, data))
    assert "dog" in labels(post(server, data, {"Content-Type": "image/png" if "PNG" in name else "image/jpeg"}))


def with_exif_orientation(jpeg, orientation):
    """The JPEG with an EXIF APP1 segment holding only an Orientation tag (0x0112)."""
    tiff = struct.pack(">2sHIH", b"MM", 42, 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    app1 = b"Exif\0\0" + tiff + struct.pack(">I", 0)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


# EXIF orientation -> how a camera stores an upright scene that a viewer shows upright again.
ORIENTATIONS = {3: cv2.ROTATE_180, 6: cv2.ROTATE_90_COUNTERCLOCKWISE, 8: cv2.ROTATE_90_CLOCKWISE}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_rotated_photo_boxes_are_as_a_viewer_shows_it(server, pixels, orientation):
    """A dog stored turned, tagged to be shown upright: found, and boxed where a viewer shows it.

    Ignoring the tag, the network would see a turned dog (which it does not find) and the boxes
    would be in the stored pixels' frame.
    """
    sideways = encode(".jpg", cv2.rotate(pixels, ORIENTATIONS[orientation]), cv2.IMWRITE_JPEG_QUALITY, 95)
    tagged = detect(server, with_exif_orientation(sideways, orientation)).json()["objects"]
    upright = detect(server, encode(".jpg", pixels, cv2.IMWRITE_JPEG_QUALITY, 95)).json()["objects"]
    assert [o["label"] for o in tagged][:3] == [o["label"] for o in upright][:3] == ["dog", "car", "truck"]
    for found, expected in zip(tagged[:3], upright):
        assert iou(found["rectangle"], expected["rectangle"]) > 0.8, (found, expected)


def iou(a, b):
    left, top = max(a["left"], b["left"]), max(a["top"], b["top"])
    right = min(a["left"] + a["width"], b["left"] + b["width"])
    bottom = min(a["top"] + a["height"], b["top"] + b["height"])
    overlap = max(0, right - left) * max(0, bottom - top)
    return overlap / (a["width"] * a["height"] + b["width"] * b["height"] - overlap)


# --- hostile JSON


def test_deeply_nested_object_is_a_400(server, dog):
    assert post(server, '{"a":' * 200000 + "1" + "}" * 200000).status == 400
    still_serving(server, dog)


def test_huge_json_with_extra_fields_is_served_and_they_are_ignored(server, dog):
    body = json.dumps({"id": "big", "image": base64.b64encode(dog).decode(), "padding": "x" * (10 << 20),
                       "extra": {"nested": [1, 2, 3]}})
    answer = post(server, body)
    assert answer.json()["id"] == "big" and "dog" in labels(answer)


def test_an_id_of_a_megabyte_is_refused(server, dog):
    assert detect(server, dog, id="x" * (1 << 20)).status == 400
    long_query = post(server, dog, {"Content-Type": "image/jpeg"}, path=API + "?id=" + "x" * 2000)
    assert long_query.status == 400 and "longer" in long_query.json()["error"]
    request_line_too_long = post(server, dog, {"Content-Type": "image/jpeg"}, path=API + "?id=" + "x" * (1 << 20))
    assert request_line_too_long.status == 414
    still_serving(server, dog)


@pytest.mark.parametrize("request_id", ["🐕 chien ñ 犬 ﷽", "a\u0000b\nc\"d\\e", "\ud800 lone surrogate", "‮rtl", ""])
def test_unicode_ids_are_echoed_intact(server, dog, request_id):
    answer = detect(server, dog, id=request_id)
    assert answer.json()["id"] == request_id
    raw = post(server, dog, {"Content-Type": "image/jpeg"},
               path=API + "?id=" + "".join(f"%{b:02X}" for b in request_id.encode("utf-8", "surrogatepass")))
    assert raw.status == 200


@pytest.mark.parametrize("fields", [
    {"id": None}, {"id": ["a"]}, {"id": {"a": 1}}, {"id": True},
    {"image": 12345}, {"image": ["AAAA"]}, {"image": None},
    {"confidence": True}, {"confidence": "0.5"}, {"nms": [0.5]}, {"nms": -0.1}, {"confidence": float("nan")},
], ids=str)
def test_wrong_types_are_a_400_naming_the_field(server, dog, fields):
    body = json.dumps({"id": "types", "image": base64.b64encode(dog).decode(), **fields})
    answer = post(server, body)
    assert answer.status == 400, answer.body
    assert next(iter(fields)) in answer.json()["error"]


def test_duplicate_keys_take_the_last_value(server, dog):
    image = base64.b64encode(dog).decode()
    answer = post(server, f'{{"id": "first", "image": "AAAA", "id": "last", "image": "{image}"}}')
    assert answer.json()["id"] == "last" and "dog" in labels(answer)


# --- last: nothing private leaks into the log or the error bodies


def test_no_traceback_path_or_image_data_in_log_or_error_bodies(server, dog):
    assert len(ERROR_BODIES) > 20, "run with the rest of this module"
    image_text = base64.b64encode(dog).decode()
    for where, text in (("log", "\n".join(server.log_lines)), ("error bodies", "\n".join(ERROR_BODIES))):
        for secret in ("Traceback", 'File "', str(ROOT), ".py", str(photo("dog.jpg").parent)):
            assert secret not in text, f"{secret!r} in the {where}"
        for start in range(0, len(image_text) - 40, 5000):
            assert image_text[start:start + 40] not in text, f"image data in the {where}"
