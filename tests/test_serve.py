import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deepdigits.serve import MAX_BATCH, create_app
from deepdigits.synthetic import render_digit, render_number


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(max_upload_bytes=2_000_000))


@pytest.fixture(scope="module")
def seven(mnist):
    return render_digit(mnist.x_test[0], np.random.default_rng(5))  # a JPEG photo of a 7


def png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def check_prediction(body: dict, digit: int):
    assert body["digit"] == digit
    assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-3
    assert abs(body["confidence"] - max(body["probabilities"])) < 1e-5
    assert body["unsure"] is False and body["model"] == "best-cnn"
    assert body["seen"].startswith("data:image/png;base64,")


def test_predict_multipart(client, seven):
    response = client.post("/api/predict", files={"file": ("seven.jpg", seven, "image/jpeg")})
    assert response.status_code == 200
    check_prediction(response.json(), 7)


def test_predict_raw_body(client, seven):
    response = client.post("/api/predict", content=seven, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200
    check_prediction(response.json(), 7)


def test_predict_json_base64_and_data_url(client, seven):
    encoded = base64.b64encode(seven).decode()
    assert client.post("/api/predict", json={"image": encoded}).json()["digit"] == 7
    assert client.post("/api/predict", json={"image": "data:image/jpeg;base64," + encoded}).json()["digit"] == 7


def test_predict_json_pixels(client, mnist):
    pixels = mnist.x_test[1]  # a 2, already MNIST-style
    assert client.post("/api/predict", json={"pixels": pixels.tolist()}).json()["digit"] == 2
    assert client.post("/api/predict", json={"pixels": (pixels.ravel() / 255).tolist()}).json()["digit"] == 2


def test_seen_image_is_28x28(client, seven):
    seen = client.post("/api/predict", content=seven, headers={"Content-Type": "image/jpeg"}).json()["seen"]
    with Image.open(io.BytesIO(base64.b64decode(seen.split(",", 1)[1]))) as image:
        assert image.size == (28, 28)


def test_batch(client, mnist):
    files = [("files", (f"{i}.png", png_of(255 - mnist.x_test[i]), "image/png")) for i in range(5)]
    response = client.post("/api/predict/batch", files=files)
    assert response.status_code == 200
    assert [r["digit"] for r in response.json()["results"]] == mnist.y_test[:5].tolist()
    json_batch = {"images": [mnist.x_test[i].tolist() for i in range(3)]}
    assert [r["digit"] for r in client.post("/api/predict/batch", json=json_batch).json()["results"]] == [7, 2, 1]


def test_batch_limit_is_413(client, mnist):
    images = [mnist.x_test[0].tolist()] * (MAX_BATCH + 1)
    response = client.post("/api/predict/batch", json={"images": images})
    assert response.status_code == 413 and f"the limit is {MAX_BATCH}" in response.json()["detail"]


def test_read_number(client, mnist):
    photo = render_number([mnist.x_test[i] for i in (0, 1, 2, 3)], np.random.default_rng(6))
    response = client.post("/api/read-number", files={"file": ("n.jpg", photo, "image/jpeg")})
    body = response.json()
    assert response.status_code == 200 and body["number"] == "7210"
    assert [len(d["box"]) for d in body["digits"]] == [4, 4, 4, 4] and body["width"] > body["height"]


def test_read_number_bad_images_are_422_naming_the_file(client):
    blank = io.BytesIO()
    Image.new("L", (120, 60), 255).save(blank, format="PNG")
    response = client.post("/api/read-number", files={"file": ("blank.png", blank.getvalue(), "image/png")})
    assert response.status_code == 422 and response.json()["detail"] == "blank.png: no ink found: the image looks blank"
    response = client.post("/api/read-number", files={"file": ("junk.png", b"not an image", "image/png")})
    assert response.status_code == 422 and response.json()["detail"].startswith("junk.png:")


def test_model_and_health(client):
    info = client.get("/api/model").json()
    assert info["name"] == "best-cnn" and info["dataset"] == "mnist" and info["test_metrics"]["accuracy"] >= 0.995
    assert info["parameters"] > 100_000 and info["limits"]["max_upload_bytes"] == 2_000_000
    assert client.get("/healthz").json() == {"status": "ok"}


def test_docs_and_openapi_work_offline(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/predict/batch", "/api/read-number", "/api/model", "/healthz"} <= set(spec["paths"])
    docs = client.get("/docs").text
    assert "swagger" in docs.lower() and "cdn.jsdelivr" not in docs and "unpkg" not in docs


def test_page_and_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="pad"' in page.text
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200 and "https://" not in response.text


# --------------------------------------------------------------------------- errors: never a 500


def test_too_large_is_413(client):
    response = client.post("/api/predict", content=b"\x89PNG" + b"0" * 2_100_000, headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


@pytest.mark.parametrize(
    ("kwargs", "status", "text"),
    [
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported Content-Type text/plain"),
        ({"content": b"x", "headers": {"Content-Type": "image/svg+xml"}}, 415, "unsupported image type"),
        ({"content": b"not an image", "headers": {"Content-Type": "image/png"}}, 422, "not an image Pillow can read"),
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 422, "empty file"),
        ({"content": b"{bad json", "headers": {"Content-Type": "application/json"}}, 422, "malformed JSON"),
        ({"json": {"image": "%%%"}}, 422, "not valid base64"),
        ({"json": {"pixels": [[1, 2], [3, 4]]}}, 422, "expected a 28x28 or 784-value array"),
        ({"json": {"pixels": [999] * 784}}, 422, "values must lie in 0-255"),
        ({"json": {"other": 1}}, 422, "needs 'image' (base64) or 'pixels'"),
        ({"files": {"wrong": ("a.png", b"x", "image/png")}}, 422, "no file field 'file'"),
    ],
)
def test_bad_input_is_4xx_with_a_message(client, kwargs, status, text):
    response = client.post("/api/predict", **kwargs)
    assert response.status_code == status
    assert text in response.json()["detail"]


def test_blank_drawing_is_422(client):
    blank = png_of(np.full((280, 280), 255, np.uint8))
    response = client.post("/api/predict", content=blank, headers={"Content-Type": "image/png"})
    assert response.status_code == 422 and "no ink found" in response.json()["detail"]


def test_bad_min_confidence(client, seven):
    response = client.post("/api/predict?min_confidence=abc", content=seven, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 422
    unsure = client.post("/api/predict?min_confidence=1", content=seven, headers={"Content-Type": "image/jpeg"})
    assert unsure.json()["unsure"] is True


def test_concurrent_requests_are_safe(client, mnist):
    images = [png_of(255 - mnist.x_test[i]) for i in range(24)]

    def ask(i):
        response = client.post("/api/predict", content=images[i], headers={"Content-Type": "image/png"})
        return response.status_code, response.json()["digit"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(24)))
    assert all(status == 200 for status, _ in answers)
    sequential = [ask(i)[1] for i in range(24)]
    assert [digit for _, digit in answers] == sequential


def test_onnx_runtime_server_agrees(client, seven):
    onnx_client = TestClient(create_app(runtime="onnx"))
    torch_answer = client.post("/api/predict", content=seven, headers={"Content-Type": "image/jpeg"}).json()
    onnx_answer = onnx_client.post("/api/predict", content=seven, headers={"Content-Type": "image/jpeg"}).json()
    assert onnx_answer["digit"] == torch_answer["digit"] == 7
    assert abs(onnx_answer["confidence"] - torch_answer["confidence"]) < 1e-4
    info = onnx_client.get("/api/model").json()
    assert info["name"] == "best-cnn" and info["parameters"] == 150_698 and info["test_metrics"]["accuracy"] > 0.995
