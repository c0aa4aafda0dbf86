"""The HTTP API and drawing page (``deepdigits serve``): FastAPI, one model loaded at start, works offline."""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
from importlib import resources

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.concurrency import run_in_threadpool

from .errors import DeepDigitsError
from .predictor import Predictor, load
from .recognize import DEFAULT_MIN_CONFIDENCE, answer_prepared, prepare_images, read_digits
from .segment import find_digits
from .version import __version__

MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # one request body; larger gets 413
MAX_BATCH = 64  # images in one /api/predict/batch request
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/tiff", "image/webp")


class ApiError(Exception):
    """An error that becomes an HTTP status with a JSON ``{"detail": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _decode_base64(text: str, field: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise ApiError(422, f"field '{field}': expected a base64-encoded image string")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]  # a data URL from a canvas
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"field '{field}': not valid base64") from None


def _pixels_to_mnist(pixels, field: str = "pixels") -> np.ndarray:
    """A 28x28 or 784-value array (0-255, or 0-1 floats), taken as an MNIST-style image as is."""
    try:
        array = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError):
        raise ApiError(422, f"field '{field}': expected numbers in a 28x28 or 784-value array") from None
    if array.shape == (784,):
        array = array.reshape(28, 28)
    if array.shape != (28, 28):
        raise ApiError(422, f"field '{field}': expected a 28x28 or 784-value array, got shape {array.shape}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ApiError(422, f"field '{field}': values must lie in 0-255 (or 0-1)")
    if array.max() <= 1.0:
        array = array * 255.0
    return np.round(array).astype(np.uint8)


def _png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {int(declared):,} bytes; the limit is {limit:,}")


async def _read_body(request: Request, limit: int) -> bytes:
    _check_declared_length(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes")
    return bytes(body)


async def _inputs(request: Request, limit: int, many: bool) -> list[tuple[str, bytes | np.ndarray]]:
    """The request's images as ``(name, bytes)`` or ready ``(name, 28x28 array)``, whatever form they came in."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        _check_declared_length(request, limit)
        try:
            form = await request.form(max_files=MAX_BATCH + 1, max_part_size=limit)
        except Exception as exc:  # the multipart parser's own errors: malformed body
            raise ApiError(422, f"malformed multipart body ({exc})") from None
        uploads = [v for k, v in form.multi_items() if k in (("files", "file") if many else ("file",))]
        uploads = [u for u in uploads if hasattr(u, "read")]
        if not uploads:
            expected = "'files' (or 'file')" if many else "'file'"
            raise ApiError(422, f"multipart body has no file field {expected}")
        out = []
        for upload in uploads:
            data = await upload.read()
            if len(data) > limit:
                raise ApiError(413, f"{upload.filename}: {len(data):,} bytes is over the limit of {limit:,}")
            out.append((upload.filename or "upload", data))
        return out
    body = await _read_body(request, limit)
    if content_type.startswith("image/"):
        if content_type not in IMAGE_TYPES:
            raise ApiError(415, f"unsupported image type {content_type}; expected one of {', '.join(IMAGE_TYPES)}")
        return [("body", body)]
    if content_type == "application/json":
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(422, f"malformed JSON ({exc})") from None
        if not isinstance(document, dict):
            raise ApiError(422, "JSON body must be an object")
        if many:
            items = document.get("images")
            if not isinstance(items, list) or not items:
                raise ApiError(422, "field 'images': expected a non-empty list of base64 images or 28x28 arrays")
            return [(f"images[{i}]", _json_item(item, f"images[{i}]")) for i, item in enumerate(items)]
        if "image" in document:
            return [("image", _decode_base64(document["image"], "image"))]
        if "pixels" in document:
            return [("pixels", _pixels_to_mnist(document["pixels"]))]
        raise ApiError(422, "JSON body needs 'image' (base64) or 'pixels' (28x28 or 784 values)")
    shown = content_type or "none"
    raise ApiError(415, f"unsupported Content-Type {shown}; send multipart/form-data (field 'file'), "
                        "an image/* body, or application/json")


def _json_item(item, name: str) -> bytes | np.ndarray:
    if isinstance(item, str):
        return _decode_base64(item, name)
    if isinstance(item, list):
        return _pixels_to_mnist(item, name)
    raise ApiError(422, f"{name}: expected a base64 image string or a 28x28 array")


def create_app(model=None, *, runtime: str = "torch", max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_batch: int = MAX_BATCH):
    """The FastAPI application; ``model`` is a bundle path, a loaded model, or None for the built-in one.

    ``runtime="onnx"`` answers with ONNX Runtime (the model is exported in memory at start).
    """
    predictor = _predictor(model, runtime)
    card = predictor.card()
    model_name = card.name
    lock = threading.Lock()  # one inference at a time: the CPU's cores go to each request's batch
    app = FastAPIOffline(
        title="deepdigits",
        version=__version__,
        description="Recognise handwritten digits and numbers. Limits: request bodies up to "
        f"{max_upload_bytes:,} bytes (413 beyond), {max_batch} images per batch; unsupported types get 415, "
        "malformed or undecodable input 422, always with a JSON 'detail'.",
    )

    app.state.model_name = model_name

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": str(exc.errors()[0].get("msg", exc))}, status_code=422)

    def recognise(items: list[tuple[str, bytes | np.ndarray]], min_confidence: float) -> list[dict]:
        ready: list[tuple[str, np.ndarray]] = []
        for name, item in items:  # pixel arrays are MNIST-style already; images are made so (outside the lock)
            if isinstance(item, np.ndarray):
                ready.append((name, item))
                continue
            prepared, failures = prepare_images([(name, item)])
            if failures:
                raise ApiError(422, failures[0].message)
            ready.extend(prepared)
        with lock:
            results = answer_prepared(ready, predictor, 3, min_confidence)
        return [{**r.prediction.to_dict(), "model": model_name, "seen": _png_data_url(r.seen)} for r in results]

    def confidence_param(request: Request) -> float:
        raw = request.query_params.get("min_confidence", str(DEFAULT_MIN_CONFIDENCE))
        try:
            value = float(raw)
        except ValueError:
            raise ApiError(422, f"min_confidence: expected a number, got {raw!r}") from None
        if not 0 <= value <= 1:
            raise ApiError(422, f"min_confidence: expected a probability in [0, 1], got {value}")
        return value

    predict_doc = {"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string",
                                                                                     "format": "binary"}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "description": "base64 image (a data URL is fine)"},
            "pixels": {"type": "array", "description": "28x28 or 784 values, 0-255 or 0-1"}}}},
    }}}

    @app.post("/api/predict", openapi_extra=predict_doc,
              summary="Recognise one digit (multipart 'file', raw image body, or JSON image/pixels)")
    async def predict(request: Request):
        min_confidence = confidence_param(request)
        items = await _inputs(request, max_upload_bytes, many=False)
        return (await run_in_threadpool(recognise, items, min_confidence))[0]

    @app.post("/api/predict/batch", summary=f"Recognise up to {max_batch} digits (multipart 'files' or JSON "
              "'images')")
    async def predict_batch(request: Request):
        min_confidence = confidence_param(request)
        items = await _inputs(request, max_upload_bytes, many=True)
        if len(items) > max_batch:
            raise ApiError(413, f"{len(items)} images in one batch; the limit is {max_batch}")
        return {"results": await run_in_threadpool(recognise, items, min_confidence), "model": model_name}

    @app.post("/api/read-number", openapi_extra=predict_doc,
              summary="Read a whole handwritten number, with each digit's box")
    async def read_number_route(request: Request):
        min_confidence = confidence_param(request)
        items = await _inputs(request, max_upload_bytes, many=False)
        name, item = items[0]
        if isinstance(item, np.ndarray):
            raise ApiError(422, "read-number needs an image, not a 28x28 pixel array")

        def work() -> dict:
            try:
                found = find_digits(item, name)  # decoding and segmenting need no lock
            except DeepDigitsError as exc:
                raise ApiError(422, str(exc)) from None
            with lock:
                reading = read_digits(found, predictor, min_confidence)
            return {**reading.to_dict(), "width": reading.size[0], "height": reading.size[1], "model": model_name}

        return await run_in_threadpool(work)

    @app.get("/api/model", summary="The model being served")
    def model_info():
        return {**card.to_dict(), "limits": {"max_upload_bytes": max_upload_bytes, "max_batch": max_batch}}

    @app.get("/healthz", summary="Liveness check")
    def healthz():
        return {"status": "ok"}

    web = resources.files("deepdigits") / "web"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse((web / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(web)), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    return app


def _predictor(model, runtime: str) -> Predictor:
    """The model to serve: a loaded predictor as given (exported in memory for ONNX Runtime), else ``load``."""
    if not isinstance(model, Predictor):
        return load(model, runtime)
    from .export import OnnxClassifier

    if runtime == "onnx" and not isinstance(model, OnnxClassifier):
        return OnnxClassifier.from_classifier(model)
    return model


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, runtime: str = "torch") -> None:
    """Run the server until Ctrl-C."""
    import uvicorn

    app = create_app(model, runtime=runtime)
    print(f"deepdigits serving {app.state.model_name} ({runtime}) at http://{host}:{port}/ "
          f"(API docs: http://{host}:{port}/docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
