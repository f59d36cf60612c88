"""The state of one server and the work of one prediction, apart from HTTP: options, the A/B router, the
temporary folder, the bounded work queue, the kept results, the metrics and the request log.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from medseg.data.io import atomic_path
from medseg.serve.metrics import Metrics
from medseg.serve.requests_log import RequestLog, log_columns, structure_values
from medseg.serve.results import Result, ResultStore
from medseg.serve.routing import Arm, Router
from medseg.serve.uploads import Prepared
from medseg.serve.workers import WorkQueue

MB = 1024 * 1024
SERVE_MAX_VOXELS = 128 * MB
"""``medseg serve``'s default ``--max-voxels``: 134,217,728 voxels (a 512 x 512 x 512 volume), about 5 GiB of
memory while predicted (some 40 bytes per voxel), however small the (compressed) upload that claims them."""
logger = logging.getLogger("medseg.serve")


@dataclass
class ServeOptions:
    """How a server runs (``medseg serve``'s options).

    Attributes:
        split: share of arm B (the second model) when two are served.
        max_upload_mb: the largest upload accepted (413 above, enforced while it streams in); a zip of DICOM
            may expand to 4 times this.
        workers: inference threads (the models are shared between them).
        queue: requests that may be admitted beyond ``workers`` (uploading, being checked or waiting for a
            worker); more get 503 with ``Retry-After`` before their upload is read.
        log: the request log (CSV), or ``None`` for none.
        keep_predictions: a folder for each label map as ``<model>/<case>__<request>.nii.gz``, or ``None``.
        keep_results: how many results stay downloadable.
        max_voxels: the most voxels an uploaded header may claim (422 above).
        max_voxels_in_flight: the most voxels predicted at once over all workers (``None``: ``max_voxels``);
            a prediction waits for a worker and for room under this bound.
        upload_timeout_s: the most seconds an upload's body may take to arrive (408 after).
        retry_after_s: the ``Retry-After`` of a 503.
        temp_root: where the server's temporary folder is made (default: the system's temporary folder).
    """

    split: float = 0.5
    max_upload_mb: float = 512.0
    workers: int = 1
    queue: int = 8
    log: Path | None = Path("serve_requests.csv")
    keep_predictions: Path | None = None
    keep_results: int = 32
    max_voxels: int = SERVE_MAX_VOXELS
    max_voxels_in_flight: int | None = None
    upload_timeout_s: float = 60.0
    retry_after_s: int = 5
    temp_root: Path | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)


class Service:
    """Everything a running server holds; :meth:`close` removes its temporary folder."""

    def __init__(self, models: Sequence[Any], options: ServeOptions) -> None:
        self.options = options
        self.router = Router(models, options.split)
        self.queue = WorkQueue(options.workers, options.queue, options.max_voxels_in_flight or options.max_voxels)
        self.log = RequestLog(options.log, log_columns(models)) if options.log else None
        self.metrics = Metrics([arm.name for arm in self.router.arms],
                               lambda: {"queue_depth": self.queue.depth, "inference_running": self.queue.running})
        self.workdir = Path(tempfile.mkdtemp(prefix="medseg-serve-", dir=options.temp_root))
        self.uploads = self.workdir / "requests"
        self.uploads.mkdir()
        self.results = ResultStore(self.workdir / "results", options.keep_results)

    def close(self) -> None:
        """Wait for running predictions, then remove the temporary folder (uploads and results)."""
        self.queue.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def predict(self, arm: Arm, prepared: Prepared, record: dict[str, Any]) -> Result:
        """Predict one prepared upload with ``arm``'s model and keep the result (on a worker thread).

        Writes the label map (NIfTI with the input's affine; a DICOM SEG too for DICOM input), the input for
        the viewer and, with ``keep_predictions``, ``<model>/<case>__<request>.nii.gz`` there (one file per
        request: repeated or similar case ids do not overwrite each other); fills ``record`` (the log row) with
        the structures, the doubt and the kept file's absolute path.
        """
        model = arm.model
        prediction = model.predict(str(prepared.path), probabilities=False, max_voxels=self.options.max_voxels)
        folder = self.results.folder_for(record["request"])
        try:
            return self._keep(arm, prepared, prediction, folder, record)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _keep(self, arm: Arm, prepared: Prepared, prediction: Any, folder: Path, record: dict[str, Any]) -> Result:
        model = arm.model
        summary = dict(prediction.summary)
        result = Result(record["request"], folder, summary, prepared.kind, int(model.spatial_dims),
                        list(model.label_names))
        if prediction.labels is not None:
            result.files["labels"] = _write_labels(prediction.labels, prediction.affine, folder / "labels.nii.gz")
            if prepared.kind == "dicom":
                result.files.update(_dicom_outputs(prediction, prepared.path, model, folder, self.options.max_voxels))
            else:
                # our own name (image.nii.gz, image.nii, image.png), never the client's
                result.files["image"] = Path(shutil.move(str(prepared.path), folder / prepared.path.name))
            if self.options.keep_predictions:
                kept = self.options.keep_predictions.resolve() / file_safe(arm.name) / kept_name(record)
                with atomic_path(kept) as tmp:
                    shutil.copyfile(result.files["labels"], tmp)
                record["prediction"] = str(kept)
        record.update(structure_values(summary, int(model.spatial_dims)), doubt=summary.get("doubt"))
        return result


def _write_labels(labels: Any, affine: Any, path: Path) -> Path:
    """The label map as NIfTI, uint8 when its values fit (as ``medseg predict`` writes it), else int16."""
    import numpy as np

    from medseg.data.io import write_nifti

    top = int(labels.max()) if labels.size else 0
    return write_nifti(labels, affine, path, dtype=np.uint8 if 0 <= int(labels.min(initial=0)) and top <= 255
                       else np.int16)


def _dicom_outputs(prediction: Any, series: Path, model: Any, folder: Path, max_voxels: int) -> dict[str, Path]:
    """For a DICOM input: the series as NIfTI (for the viewer) and the labels as a DICOM SEG."""
    import numpy as np

    from medseg.data.dicom import read_series
    from medseg.data.io import write_nifti
    from medseg.errors import InputError
    from medseg.inference.dicom_seg import write_dicom_seg

    image, affine = read_series(series, max_voxels=max_voxels)
    files = {"image": write_nifti(image.astype(np.float32), affine, folder / "image.nii.gz")}
    names = list(getattr(model, "structures", None) or model.label_names[1:])
    try:
        files["dicom_seg"] = Path(write_dicom_seg(prediction.labels, series, names, folder / "labels.dcm",
                                                  regions=getattr(model, "regions", None), max_voxels=max_voxels))
    except (InputError, ValueError) as err:  # e.g. a region model whose regions are not known here
        logger.warning("no DICOM SEG for this prediction: %s", err)
    return files


def file_safe(text: str | None, default: str = "case") -> str:
    """``text`` as a file name: characters outside ``[A-Za-z0-9._-]`` become ``_``, leading dots and ``_`` go."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text or "").lstrip("._")[:120]
    return safe or default


def kept_name(record: dict[str, Any]) -> str:
    """``<case>__<request>.nii.gz``: the file-safe case id (at most 120 characters) and the request id, so two
    requests never share a kept file."""
    return f"{file_safe(record['case'], 'case')}__{record['request']}.nii.gz"


def case_from_filename(filename: str) -> str:
    """The case id a file name suggests: its last part without ``.nii.gz``/``.nii``/``.zip``/``.png``. Logged as
    the request's case, never used to route it (every client's ``image.nii.gz`` would meet one arm)."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    for suffix in (".nii.gz", ".nii", ".zip", ".png"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def summary_header(body: dict[str, Any]) -> str:
    """The response's JSON as one ASCII header value (``X-Medseg-Summary``)."""
    return json.dumps(body, ensure_ascii=True, separators=(",", ":"))
