"""POST /api/object_detection?annotate=1 answers the photo as a JPEG with the boxes drawn on it."""

import cv2
import numpy as np

from conftest import photo

ANNOTATE = "/api/object_detection?annotate=1"


def test_annotated_jpeg_has_the_boxes_drawn(server):
    raw = photo("dog.jpg").read_bytes()
    answer = server.detect(raw)
    assert answer.status == 200, answer.body
    boxes = [o["rectangle"] for o in answer.json()["objects"]]
    assert boxes, "dog.jpg should have objects to draw"

    answer = server.detect(raw, path=ANNOTATE)
    assert (answer.status, answer.headers["Content-Type"]) == (200, "image/jpeg"), answer.body[:200]
    annotated = cv2.imdecode(np.frombuffer(answer.body, np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    assert annotated is not None, "the answer is not a decodable JPEG"
    assert annotated.shape == original.shape

    # Where the JSON answer's rectangles have their edges, a few pixels either side.
    edges = np.zeros(original.shape[:2], np.uint8)
    for b in boxes:
        cv2.rectangle(edges, (b["left"], b["top"]), (b["left"] + b["width"], b["top"] + b["height"]), 255, 7)
    # Away from them: beyond the label tags too, which sit just above the boxes.
    away = cv2.dilate(edges, np.ones((61, 61), np.uint8)) == 0
    difference = np.abs(annotated.astype(np.int16) - original).sum(axis=2)
    near, far = difference[edges > 0].mean(), difference[away].mean()
    # JPEG re-encoding changes every pixel a little; the drawn boxes change theirs a lot.
    assert near > 40, (near, far)
    assert near > 5 * far, (near, far)


def test_annotate_rejects_a_non_image_with_a_json_error(server):
    answer = server.detect(b"not a photo\n", path=ANNOTATE)
    assert answer.status == 400
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json()["error"]
