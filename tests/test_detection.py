"""Detections: the server agrees with an independent cv2.dnn pipeline and with a person's eye."""

import concurrent.futures
import itertools

import cv2
import numpy as np
import pytest

from conftest import DARKNET, MODEL_DIR, coco_photos, photo


@pytest.fixture(scope="module")
def reference():
    """OpenCV's samples/dnn/object_detection.py way, written separately from server.py."""
    net = cv2.dnn.readNetFromDarknet(str(MODEL_DIR / "yolov3-tiny.cfg"), str(MODEL_DIR / "yolov3-tiny.weights"))
    labels = (MODEL_DIR / "coco.names").read_text().strip().split("\n")

    def detect(path, confidence=0.3, nms=0.45):
        image = cv2.imread(str(path))
        height, width = image.shape[:2]
        net.setInput(cv2.dnn.blobFromImage(image, 1 / 255.0, (416, 416), swapRB=True, crop=False))
        found = {}
        for output in net.forward(net.getUnconnectedOutLayersNames()):
            for detection in output:
                scores = detection[5:]
                class_id = int(np.argmax(scores))
                if scores[class_id] <= confidence:
                    continue
                cx, cy, w, h = detection[0] * width, detection[1] * height, detection[2] * width, detection[3] * height
                left, top = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
                right, bottom = min(float(width), cx + w / 2), min(float(height), cy + h / 2)
                found.setdefault(class_id, []).append(([left, top, right - left, bottom - top], float(scores[class_id])))
        objects = []
        for class_id, candidates in found.items():
            boxes, scores = zip(*candidates)
            for i in np.array(cv2.dnn.NMSBoxes(list(boxes), list(scores), confidence, nms)).reshape(-1):
                objects.append((labels[class_id], scores[i], boxes[i]))
        return sorted(objects, key=lambda o: -o[1])

    return detect


def assert_same(answer, expected):
    assert len(answer) == len(expected), (answer, expected)
    for got, (label, score, box) in zip(answer, expected):
        assert got["label"] == label
        assert got["accuracy"] == pytest.approx(score, abs=1e-3)
        rect = got["rectangle"]
        assert [rect["left"], rect["top"], rect["width"], rect["height"]] == pytest.approx(box, abs=1.5)


def darknet_photos():
    return sorted(DARKNET.glob("*.jpg")) or [DARKNET / "dog.jpg"]


@pytest.mark.parametrize("path", darknet_photos(), ids=lambda p: p.name)
def test_darknet_photos_match_reference(server, reference, path):
    answer = server.detect(photo(path.name).read_bytes(), request_id=path.name)
    assert answer.status == 200
    assert answer.json()["id"] == path.name
    assert_same(answer.json()["objects"], reference(path))


def test_coco128_sample_matches_reference(server, reference):
    for path in coco_photos()[::8]:
        answer = server.detect(path.read_bytes(), request_id=path.name)
        assert answer.status == 200, path
        assert_same(answer.json()["objects"], reference(path))


def test_per_request_thresholds_match_reference(server, reference):
    path = photo("horses.jpg")
    answer = server.detect(path.read_bytes(), confidence=0.1, nms=0.3)
    assert_same(answer.json()["objects"], reference(path, confidence=0.1, nms=0.3))
    loose = len(answer.json()["objects"])
    strict = len(server.detect(path.read_bytes(), confidence=0.6).json()["objects"])
    assert loose > strict


@pytest.mark.parametrize("name, label", [
    ("dog.jpg", "dog"), ("dog.jpg", "bicycle"), ("horses.jpg", "horse"), ("person.jpg", "person"),
    ("kite.jpg", "kite"), ("eagle.jpg", "bird"), ("giraffe.jpg", "giraffe"),
])
def test_finds_what_a_person_sees(server, name, label):
    objects = server.detect(photo(name).read_bytes()).json()["objects"]
    assert label in {o["label"] for o in objects}


def test_answer_shape_and_order(server):
    path = photo("dog.jpg")
    height, width = cv2.imread(str(path)).shape[:2]
    answer = server.detect(path.read_bytes(), request_id="shape").json()
    assert list(answer) == ["id", "objects"]
    accuracies = [o["accuracy"] for o in answer["objects"]]
    assert accuracies == sorted(accuracies, reverse=True)
    for obj in answer["objects"]:
        assert list(obj) == ["label", "accuracy", "rectangle"]
        rect = obj["rectangle"]
        assert list(rect) == ["height", "left", "top", "width"]
        assert all(isinstance(v, int) for v in rect.values())
        assert 0 <= rect["left"] and rect["left"] + rect["width"] <= width
        assert 0 <= rect["top"] and rect["top"] + rect["height"] <= height


def test_concurrent_requests_get_their_own_answers(server):
    """16 clients at once must never see each other's results (the reference server did)."""
    paths = darknet_photos() + coco_photos()[:9]
    images = {p.name: photo(p.name).read_bytes() if p.parent == DARKNET else p.read_bytes() for p in paths}
    sequential = {name: server.detect(data).json()["objects"] for name, data in images.items()}
    jobs = list(itertools.islice(itertools.cycle(images), 224))

    def post(numbered):
        number, name = numbered
        request_id = f"{name}#{number}"
        return request_id, name, server.detect(images[name], request_id=request_id)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for request_id, name, answer in pool.map(post, enumerate(jobs)):
            assert answer.status == 200
            assert answer.json() == {"id": request_id, "objects": sequential[name]}
