"""The FastAPI app of ``medseg serve``: :func:`create_app`.

Endpoints::

    POST /predict                     multipart field ``file`` (+ ``case``, ``patient`` or X-Case-Id / X-Patient-Id)
                                      -> JSON summary; ``?return=file`` or ``Accept: application/octet-stream``
                                      -> the label file, the summary in the ``X-Medseg-Summary`` header
    GET  /results/{id}/labels         NIfTI label map (a DICOM SEG when DICOM came in)
    GET  /results/{id}/labels.nii.gz  NIfTI label map;  /labels.dcm  DICOM SEG;  /summary.json;  /view.json
    GET  /health, /models, /metrics   status and queue depth; the models and their A/B shares; Prometheus text
    GET  /                            the viewer (static files under /static)

A refused request answers ``{"error": kind, "detail": reason, ...}`` with its status: 400 ``bad_request``, 408
``timeout`` (the body took longer than ``--upload-timeout``), 413 ``too_large``, 415 ``unsupported``, 422
``bad_image``, 503 ``busy`` (with ``Retry-After``), 500 ``internal_<Exception>``; each is counted in
``/metrics`` and logged, and the server goes on. A request takes its place in the bounded queue
(:mod:`medseg.serve.workers`) before its body is read and keeps it until it is answered, so a full server refuses
an upload before receiving it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from medseg.serve import uploads
from medseg.serve.metrics import CONTENT_TYPE
from medseg.serve.results import Result, view_data
from medseg.serve.routing import Arm, routing_key
from medseg.serve.service import ServeOptions, Service, case_from_filename, file_safe, summary_header
from medseg.serve.uploads import UploadRejected
from medseg.serve.workers import QueueFull, Slot

STATIC = Path(__file__).parent / "static"
logger = logging.getLogger("medseg.serve")


def create_app(models: Sequence[Any], options: ServeOptions | None = None) -> FastAPI:
    """The app serving ``models`` (one, or two for an A/B test) with ``options``.

    The server's temporary folder is made now (``app.state.service.workdir``) and removed when the app shuts
    down (its lifespan's end: uvicorn's stop, or leaving a ``TestClient`` context).
    """
    service = Service(models, options or ServeOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(title="medseg serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def viewer() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        queue = service.queue
        return {"status": "ok", "models": [arm.name for arm in service.router.arms], "queue_depth": queue.depth,
                "running": queue.running, "workers": queue.workers, "queue": queue.queue,
                "voxels_running": queue.voxels, "max_voxels_in_flight": queue.max_voxels}

    @app.get("/models")
    async def models_endpoint() -> dict[str, Any]:
        return {"split": service.router.split,
                "models": [{"name": arm.name, "arm": arm.label, "share": arm.share, "task": arm.model.task,
                            "spatial_dims": arm.model.spatial_dims, "label_names": list(arm.model.label_names),
                            "spec": arm.model.spec} for arm in service.router.arms]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await _predict(service, request)

    @app.get("/results/{result_id}/{name}")
    async def result_file(result_id: str, name: str) -> Response:
        result = service.results.get(result_id)
        if result is None:
            return _error(404, "not_found", f"no result {result_id!r} (results are kept for the last "
                                            f"{service.results.keep} predictions)")
        if name == "view.json":
            if "labels" not in result.files:
                return _error(404, "not_found", f"result {result_id} has no label map to view (a classification)")
            return JSONResponse(await run_in_threadpool(view_data, result))
        if name == "summary.json":
            return JSONResponse(result.summary)
        key = {"labels": "dicom_seg" if "dicom_seg" in result.files else "labels", "labels.nii.gz": "labels",
               "labels.dcm": "dicom_seg"}.get(name)
        if key is None or key not in result.files:
            return _error(404, "not_found", f"result {result_id} has no {name!r}")
        return _file(result, key)

    return app


async def _predict(service: Service, request: Request) -> Response:
    """``POST /predict``: take a place, receive, route, check, predict, answer; always counted and logged."""
    start = time.perf_counter()
    record: dict[str, Any] = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                              "request": uuid.uuid4().hex, "case": "", "patient": "", "input": ""}
    arm = _route(service, record, "")
    folder = service.uploads / record["request"]
    upload: uploads.Upload | None = None
    slot: Slot | None = None
    try:
        raw = request.headers.raw
        given_case = uploads.identifier(uploads.header_value(raw, b"x-case-id"), "header X-Case-Id")
        record["patient"] = uploads.identifier(uploads.header_value(raw, b"x-patient-id"), "header X-Patient-Id")
        record["case"] = given_case
        slot = service.queue.admit()  # before the body is read: uploads count against the queue too
        folder.mkdir()
        upload = await uploads.receive_upload(request.headers, request.stream(), folder,
                                              service.options.max_upload_bytes, service.options.upload_timeout_s)
        given_case = uploads.identifier(upload.fields.get("case"), "form field case") or given_case
        record["patient"] = uploads.identifier(upload.fields.get("patient"), "form field patient") or \
            record["patient"]
        record["case"] = given_case or case_from_filename(upload.filename)
        arm = _route(service, record, given_case)
        model = arm.model
        prepared = await run_in_threadpool(
            uploads.prepare, upload, int(model.spatial_dims), int(model.in_channels), service.options.max_voxels,
            4 * service.options.max_upload_bytes)
        record["input"] = prepared.kind
        result = await service.queue.run(slot, service.predict, arm, prepared, record,
                                         voxels=math.prod(prepared.shape))
        response = await _answer(service, request, arm, result, record, start)
        record["status"] = "ok"
        return response
    except Exception as err:  # every failure becomes an answer; the server goes on
        status, kind, reason = _failure(err)
        record["status"] = kind
        if status == 500:
            logger.exception("request %s failed", record["request"])
        reason = _public(reason, folder, upload.filename if upload else "upload", service.workdir)
        headers = {"Retry-After": str(service.options.retry_after_s)} if status == 503 else None
        return _error(status, kind, reason, headers, request=record["request"], model=arm.name)
    finally:
        if slot is not None:
            slot.release()  # a prediction still running keeps the place until it ends
        record["model"] = arm.name
        record["latency_s"] = round(time.perf_counter() - start, 4)
        record.setdefault("status", "cancelled")  # a BaseException: the server stopping, a cancelled task
        service.metrics.observe(arm.name, record["status"], record["latency_s"])
        with anyio.CancelScope(shield=True):  # written even when the request was cancelled; off the event loop
            await run_in_threadpool(_log_and_clean, service, record, folder)


def _log_and_clean(service: Service, record: dict[str, Any], folder: Path) -> None:
    """The log row (flushed and fsynced) and the removal of the request's upload folder: blocking work."""
    try:
        if service.log is not None:
            service.log.append(record)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _route(service: Service, record: dict[str, Any], given_case: str) -> Arm:
    """The arm of a request: by its patient, else the case id the client gave, else its request id (a case id
    taken from the file name does not route: every client's ``image.nii.gz`` would meet one arm)."""
    return service.router.choose(routing_key(record["patient"], given_case, record["request"]))


async def _answer(service: Service, request: Request, arm: Arm, result: Result, record: dict[str, Any],
                  start: float) -> Response:
    """The JSON answer (kept as the result's summary), or the label file with it in a header."""
    base = f"/results/{result.id}"
    links = {"summary": f"{base}/summary.json", "view": f"{base}/view.json"}
    if "labels" in result.files:
        links.update(labels=f"{base}/labels", nifti=f"{base}/labels.nii.gz")
    if "dicom_seg" in result.files:
        links["dicom_seg"] = f"{base}/labels.dcm"
    body = {**result.summary, "model": arm.name, "arm": arm.label, "request": record["request"],
            "result": result.id, "case": record["case"], "patient": record["patient"], "input": result.input,
            "latency_s": round(time.perf_counter() - start, 4), "download": links.get("labels"),
            "downloads": links}
    result.summary = body
    await run_in_threadpool(service.results.add, result)  # may delete old results' folders
    wants_file = request.query_params.get("return") == "file" or \
        "application/octet-stream" in request.headers.get("accept", "")
    if wants_file and "labels" in result.files:
        return _file(result, "dicom_seg" if "dicom_seg" in result.files else "labels",
                     {"X-Medseg-Summary": summary_header(body)})
    return JSONResponse(body)


def _file(result: Result, key: str, headers: dict[str, str] | None = None) -> FileResponse:
    case = file_safe(result.summary.get("case"), result.id)
    name, media = ((f"{case}_seg.dcm", "application/dicom") if key == "dicom_seg"
                   else (f"{case}_labels.nii.gz", "application/gzip"))
    return FileResponse(result.files[key], media_type=media, filename=name, headers=headers)


def _failure(err: Exception) -> tuple[int, str, str]:
    """HTTP status, error kind and reason of a failed request."""
    from starlette.requests import ClientDisconnect

    from medseg.data.io import ImageReadError
    from medseg.errors import InputError

    if isinstance(err, UploadRejected):
        return err.status, err.kind, err.reason
    if isinstance(err, QueueFull):
        return 503, "busy", f"the server is busy ({err}); retry later"
    if isinstance(err, (InputError, ImageReadError)):
        return 422, "bad_image", str(err)
    if isinstance(err, ClientDisconnect):  # nobody reads the answer; the log and the metrics do
        return 400, "disconnected", "the client went away during the upload"
    return 500, f"internal_{type(err).__name__}", f"{type(err).__name__}: {err}"


def _public(reason: str, folder: Path, filename: str, workdir: Path) -> str:
    """``reason`` with the server's temporary paths replaced by the uploaded file's name."""
    for path in (folder / "series", folder / "image.nii.gz", folder / "image.nii", folder / "image.png",
                 folder / "upload.bin", folder):
        reason = reason.replace(str(path), filename)
    return reason.replace(str(workdir), "<server>")


def _error(status: int, kind: str, reason: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": reason, **extra}, status_code=status, headers=headers)
