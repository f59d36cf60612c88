"""``medseg serve``: the HTTP service, its A/B routing, request log, metrics, refusals and bounded queue.

Most tests use :class:`FakeModel` (a threshold "segmentation" with the interface of :class:`medseg.api.Model`,
fast and predictable); the integration tests serve a real exported model and compare with ``model.predict``.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import gzip
import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from medseg.data.io import read_image, spacing_from_affine, write_nifti
from medseg.serve.app import create_app
from medseg.serve.requests_log import FIXED_COLUMNS
from medseg.serve.routing import Router, key_fraction
from medseg.serve.service import ServeOptions
from medseg.serve.uploads import UploadRejected, receive_upload

AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.0], [0.0, 0.0, 0.0, 1.0]])


class FakeModel:
    """``medseg.api.Model``'s interface: label 1 where the image exceeds its mean, label 2 above mean + 1 std.

    ``gate``: a :class:`threading.Event` each prediction waits for (to hold workers busy); ``fail``: an
    exception each prediction raises; ``truth``: a label map returned instead (a perfect model of one case).
    """

    task = "segmentation"
    in_channels = 1

    def __init__(self, name: str = "fake", spatial_dims: int = 3, gate: threading.Event | None = None,
                 fail: Exception | None = None, truth: Path | None = None,
                 label_names: tuple[str, ...] = ("background", "organ", "core")) -> None:
        self.name, self.spatial_dims, self.gate, self.fail, self.truth = name, spatial_dims, gate, fail, truth
        self.label_names = list(label_names)
        self.structures = self.label_names[1:]
        self.spec = {"name": name, "spatial_dims": spatial_dims}
        self.started = threading.Semaphore(0)

    def predict(self, path: str, **_: Any) -> SimpleNamespace:
        self.started.release()
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail is not None:
            raise self.fail
        if Path(path).is_dir():
            from medseg.data.dicom import read_series

            image, affine = read_series(path)
        else:
            image, affine = read_image(path)
        labels = fake_labels(image) if self.truth is None else read_image(self.truth, np.int16)[0]
        spacing = spacing_from_affine(affine, labels.ndim)
        unit = "volume_ml" if labels.ndim == 3 else "area_mm2"
        scale = 1000.0 if labels.ndim == 3 else 1.0
        structures = {name: {"label": k, "voxels": int((labels == k).sum()),
                             unit: float((labels == k).sum() * np.prod(spacing) / scale)}
                      for k, name in enumerate(self.structures, start=1)}
        summary = {"model": self.name, "task": self.task, "shape": list(labels.shape),
                   "spacing_mm": spacing.tolist(), "structures": structures, "doubt": 0.25, "members": 1}
        return SimpleNamespace(labels=labels, probabilities=None, affine=affine, summary=summary)


def fake_labels(image: np.ndarray) -> np.ndarray:
    labels = (image > image.mean()).astype(np.int16)
    labels[image > image.mean() + image.std()] = 2
    return labels


def volume(shape: tuple[int, ...] = (12, 10, 6), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(100.0, 20.0, size=shape).astype(np.float32)


def nifti_bytes(tmp: Path, array: np.ndarray, affine: np.ndarray = AFFINE, name: str = "scan.nii.gz") -> bytes:
    return write_nifti(array, affine, tmp / name).read_bytes()


@contextmanager
def serving(tmp: Path, *models: Any, **options: Any) -> Iterator[TestClient]:
    """A TestClient of an app serving ``models`` (log in ``tmp/log.csv``, temporary folder under ``tmp``)."""
    (tmp / "temp").mkdir(exist_ok=True)
    settings = {"log": tmp / "log.csv", "temp_root": tmp / "temp", **options}
    with TestClient(create_app(list(models), ServeOptions(**settings))) as client:
        yield client


def post(client: TestClient, data: bytes, name: str = "scan.nii.gz", **fields: str) -> Any:
    return client.post("/predict", files={"file": (name, data)}, data=fields)


def log_rows(tmp: Path) -> list[dict[str, str]]:
    with open(tmp / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus exposition text -> {(name, labels): value}; checks every line's syntax."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP medseg_", "# TYPE medseg_")), line
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        pairs = frozenset(tuple(p.split("=", 1)) for p in labels.rstrip("}").split(",") if p)
        samples[name, frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)
    return samples


# ------------------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def exported(seg3d_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import medseg
    from medseg.deploy.export import export_model

    folder = export_model([seg3d_checkpoint], tmp_path_factory.mktemp("served") / "seg3d", bundle=False)
    return medseg.load(folder, device="cpu")


def test_predict_nifti_with_the_exported_model(exported: Any, seg3d_root: Path, tmp_path: Path) -> None:
    image = sorted((seg3d_root / "imagesTr").glob("*.nii.gz"))[0]
    expected = exported.predict(str(image))
    with serving(tmp_path, exported) as client:
        answer = post(client, image.read_bytes(), image.name, patient="p7")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == exported.name and body["case"] == image.name[: -len(".nii.gz")]
        assert body["download"] == f"/results/{body['result']}/labels" and body["input"] == "nifti"
        served = client.get(body["download"])
        file_answer = client.post("/predict?return=file", files={"file": (image.name, image.read_bytes())})
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(served.content))
    source = nib.load(image)
    np.testing.assert_array_equal(np.asarray(labels.dataobj), expected.labels)
    np.testing.assert_allclose(labels.affine, source.affine, atol=1e-5)
    voxel_ml = np.prod(source.header.get_zooms()[:3]) / 1000.0
    for k, name in enumerate(exported.structures, start=1):
        structure = body["structures"][name]
        assert structure["voxels"] == int((expected.labels == k).sum())
        assert structure["volume_ml"] == pytest.approx(structure["voxels"] * voxel_ml, rel=1e-5, abs=1e-6)
    assert file_answer.status_code == 200 and file_answer.headers["content-type"] == "application/gzip"
    header = json.loads(file_answer.headers["x-medseg-summary"])
    assert header["structures"] == body["structures"] and header["result"] != body["result"]
    again = nib.Nifti1Image.from_bytes(gzip.decompress(file_answer.content))
    np.testing.assert_array_equal(np.asarray(again.dataobj), expected.labels)


def test_predict_dicom_zip_gives_a_seg(exported: Any, seg3d_root: Path, tmp_path: Path) -> None:
    import pydicom

    from medseg.data.dicom import read_series
    from medseg.data.synthetic_dicom import write_series

    image, affine = read_image(sorted((seg3d_root / "imagesTr").glob("*.nii.gz"))[1])
    series = tmp_path / "series"
    write_series(series, np.round(image), affine)
    expected = exported.predict(str(series))
    _, series_affine = read_series(series)
    with serving(tmp_path, exported) as client:
        answer = post(client, zip_of(series), "ct.zip", case="c1")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seg = client.get(body["download"])
        nifti = client.get(body["downloads"]["nifti"])
        view = client.get(body["downloads"]["view"]).json()
    assert body["input"] == "dicom" and body["download"].endswith("/labels")
    assert seg.headers["content-type"] == "application/dicom"
    dataset = pydicom.dcmread(io.BytesIO(seg.content))
    assert dataset.Modality == "SEG" and len(dataset.SegmentSequence) == len(exported.structures)
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content))
    np.testing.assert_array_equal(np.asarray(labels.dataobj), expected.labels)
    np.testing.assert_allclose(labels.affine, series_affine, atol=1e-4)
    shown = np.frombuffer(base64.b64decode(view["labels"]), np.uint8)
    assert view["input"] == "dicom" and sorted(view["shape"]) == sorted(expected.labels.shape)
    assert np.bincount(shown, minlength=3).tolist() == np.bincount(expected.labels.ravel(), minlength=3).tolist()


def zip_of(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"study/{path.relative_to(folder)}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ endpoints


def test_health_models_metrics_and_log(tmp_path: Path) -> None:
    scan = nifti_bytes(tmp_path, volume())
    with serving(tmp_path, FakeModel("alpha")) as client:
        assert client.get("/health").json() == {"status": "ok", "models": ["alpha"], "queue_depth": 0, "running": 0,
                                                "workers": 1, "queue": 8, "voxels_running": 0,
                                                "max_voxels_in_flight": 128 * 1024 * 1024}
        assert client.get("/models").json()["models"] == [{
            "name": "alpha", "arm": "A", "share": 1.0, "task": "segmentation", "spatial_dims": 3,
            "label_names": ["background", "organ", "core"], "spec": {"name": "alpha", "spatial_dims": 3}}]
        oks = [post(client, scan, "a.nii.gz", case=f"c{i}", patient="p1").json() for i in range(3)]
        assert post(client, b"not an image at all", "notes.txt").status_code == 415
        metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_metrics(metrics.text)
    assert samples["medseg_requests_total", frozenset({("model", "alpha"), ("status", "ok")})] == 3
    assert samples["medseg_requests_total", frozenset({("model", "alpha"), ("status", "unsupported")})] == 1
    assert samples["medseg_errors_total", frozenset({("kind", "unsupported")})] == 1
    assert samples["medseg_predictions_total", frozenset({("model", "alpha")})] == 3
    # the latency histogram holds the answered requests only (the 415 returned at once)
    assert samples["medseg_request_latency_seconds_count", frozenset({("model", "alpha")})] == 3
    assert samples["medseg_request_latency_seconds_bucket", frozenset({("model", "alpha"), ("le", "+Inf")})] == 3
    assert "answered (ok) requests" in metrics.text
    assert samples["medseg_queue_depth", frozenset()] == 0

    rows = log_rows(tmp_path)
    header = list(rows[0])
    assert header == [*FIXED_COLUMNS, "volume_ml_organ", "volume_ml_core", "prediction"]
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "unsupported"]
    assert [row["request"] for row in rows[:3]] == [body["request"] for body in oks]
    labels = fake_labels(volume())
    voxel_ml = 1.5 * 2.0 * 3.0 / 1000.0  # the column norms of AFFINE
    first = rows[0]
    assert (first["case"], first["patient"], first["model"], first["input"]) == ("c0", "p1", "alpha", "nifti")
    assert float(first["volume_ml_organ"]) == pytest.approx((labels == 1).sum() * voxel_ml, rel=1e-5)
    assert float(first["volume_ml_core"]) == pytest.approx((labels == 2).sum() * voxel_ml, rel=1e-5)
    assert float(first["doubt"]) == 0.25 and float(first["latency_s"]) >= 0 and first["prediction"] == ""
    assert rows[3]["input"] == "" and rows[3]["volume_ml_organ"] == "" and rows[3]["case"] == "notes.txt"
    for row in rows:
        assert row["time"].endswith("+00:00") and len(row["request"]) == 32


def test_keep_predictions_and_bounded_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = nifti_bytes(tmp_path, volume())
    monkeypatch.chdir(tmp_path)
    kept = Path("kept")  # relative: the log holds the absolute path, so ab-report finds it from any folder
    with serving(tmp_path, FakeModel("m/1"), keep_predictions=kept, keep_results=2) as client:
        # "../case 0" and "case_0" are one file-safe name, and a case may come twice: one file per request
        cases = ["../case 0", "case_0", "../case 0", "case 2"]
        ids = [post(client, scan, case=case).json()["result"] for case in cases]
        assert client.get(f"/results/{ids[0]}/labels").status_code == 404  # the oldest is gone
        assert client.get(f"/results/{ids[3]}/labels.nii.gz").status_code == 200
        assert client.get("/results/..%2F..%2Fetc/labels").status_code == 404
    names = [f"case_0__{ids[0]}.nii.gz", f"case_0__{ids[1]}.nii.gz", f"case_0__{ids[2]}.nii.gz",
             f"case_2__{ids[3]}.nii.gz"]
    assert sorted(p.relative_to(tmp_path / kept).as_posix() for p in (tmp_path / kept).rglob("*")) == [
        "m_1", *sorted(f"m_1/{name}" for name in names)]
    np.testing.assert_array_equal(read_image(kept / "m_1" / names[3], np.int16)[0], fake_labels(volume()))
    assert [row["prediction"] for row in log_rows(tmp_path)] == [str(tmp_path / kept / "m_1" / name)
                                                                 for name in names]


class FakeClassifier(FakeModel):
    """A classifier: "bright" when the image's mean exceeds 100."""

    task = "classification"

    def predict(self, path: str, **_: Any) -> SimpleNamespace:
        image, affine = read_image(path)
        p = 0.9 if image.mean() > 100 else 0.2
        summary = {"model": self.name, "task": self.task, "prediction": "bright" if p > 0.5 else "dark",
                   "probabilities": {"dark": 1 - p, "bright": p}, "members": 1}
        return SimpleNamespace(labels=None, probabilities=np.array([1 - p, p]), affine=affine, summary=summary)


def test_a_classifier_answers_its_class(tmp_path: Path) -> None:
    model = FakeClassifier("cls", label_names=("dark", "bright"))
    with serving(tmp_path, model) as client:
        bright = post(client, nifti_bytes(tmp_path, volume() + 50))
        dark = client.post("/predict?return=file", files={"file": ("d.nii.gz", nifti_bytes(tmp_path, volume() - 50))})
        assert client.get(f"/results/{dark.json()['result']}/view.json").status_code == 404
    assert (bright.json()["prediction"], dark.json()["prediction"]) == ("bright", "dark")
    assert dark.headers["content-type"] == "application/json" and dark.json()["download"] is None
    rows = log_rows(tmp_path)
    assert list(rows[0])[len(FIXED_COLUMNS):] == ["probability_dark", "probability_bright", "prediction"]
    assert [float(row["probability_bright"]) for row in rows] == pytest.approx([0.9, 0.2])


# ------------------------------------------------------------------------------------------ A/B


@pytest.mark.parametrize("split", [0.5, 0.2])
def test_split_shares_and_stability(split: float) -> None:
    router = Router([FakeModel("a"), FakeModel("b")], split)
    arms = [router.choose(f"patient-{i}").label for i in range(10_000)]
    assert abs(arms.count("B") / len(arms) - split) < 0.02
    assert all(router.choose(f"patient-{i}").label == arms[i] for i in range(0, 10_000, 97))


def test_split_is_the_same_across_processes() -> None:
    ids = [f"p{i}" for i in range(40)]
    code = ("import json, sys; from medseg.serve.routing import key_fraction; "
            "print(json.dumps([key_fraction(k) for k in json.loads(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert json.loads(out) == [key_fraction(k) for k in ids]
    assert 0.0 <= min(json.loads(out)) and max(json.loads(out)) < 1.0


def test_ab_routing_by_patient_and_case(tmp_path: Path) -> None:
    scan = nifti_bytes(tmp_path, volume())
    router = Router([FakeModel("a"), FakeModel("b")], 0.5)
    patients = [f"pat-{i}" for i in range(12)]
    with serving(tmp_path, FakeModel("a"), FakeModel("b"), split=0.5) as client:
        served = [post(client, scan, patient=p, case=f"x{i}").json()["model"] for i, p in enumerate(patients)]
        again = [client.post("/predict", files={"file": ("s.nii.gz", scan)}, headers={"X-Patient-Id": p}).json()["model"]
                 for p in patients]
        by_case = client.post("/predict", files={"file": ("s.nii.gz", scan)}, headers={"X-Case-Id": "case-9"})
        shares = {m["name"]: m["share"] for m in client.get("/models").json()["models"]}
    assert served == again == [router.choose(p).name for p in patients]
    assert {"a", "b"} == set(served)  # 12 patients meet both arms (the chance of one arm only is 2**-11)
    assert by_case.json()["model"] == router.choose("case-9").name
    assert shares == {"a": 0.5, "b": 0.5}
    assert [row["model"] for row in log_rows(tmp_path)][:12] == served


# ------------------------------------------------------------------------------------------ refusals


def test_bad_uploads_get_their_4xx(tmp_path: Path) -> None:
    scan = nifti_bytes(tmp_path, volume())
    two_channels = nifti_bytes(tmp_path, np.stack([volume(), volume()], -1), name="two.nii.gz")
    flat = nifti_bytes(tmp_path, volume((12, 10)), name="flat.nii.gz")
    rng = np.random.default_rng(1)
    cases = {
        "random bytes": (rng.bytes(5000), "scan.nii.gz", 415, "unsupported"),
        "text": (b"patient: 1\nnotes\n" * 50, "scan.nii", 415, "unsupported"),
        "truncated gzip": (scan[: len(scan) // 2], "broken.nii.gz", 422, "bad_image"),
        "gzip cut in the header": (scan[:40], "cut.nii.gz", 422, "bad_image"),
        "truncated nifti": (gzip.decompress(scan)[:600], "short.nii", 422, "bad_image"),
        "2D to a 3D model": (flat, "flat.nii.gz", 422, "bad_image"),
        "two channels": (two_channels, "two.nii.gz", 422, "bad_image"),
        "too large": (b"\x00" * (300 * 1024), "big.nii", 413, "too_large"),
        "not a zip": (b"PK\x03\x04" + rng.bytes(200), "x.zip", 400, "bad_request"),
    }
    with serving(tmp_path, FakeModel(), max_upload_mb=0.25) as client:
        workdir = client.app.state.service.workdir
        for what, (data, name, status, kind) in cases.items():
            answer = post(client, data, name)
            assert (answer.status_code, answer.json()["error"]) == (status, kind), (what, answer.text)
            assert str(workdir) not in answer.text, what
            assert client.get("/health").status_code == 200
        truncated = post(client, scan[: len(scan) // 2], "broken.nii.gz").json()["detail"]
        flat_detail = post(client, flat, "flat.nii.gz").json()["detail"]
        assert post(client, scan).status_code == 200  # still serving
        plain = client.post("/predict", content=scan, headers={"content-type": "application/octet-stream"})
        no_file = client.post("/predict", data={"case": "x"}, files={"other": ("a", b"b")})
        assert list(workdir.joinpath("requests").iterdir()) == []  # every request's upload folder removed
    assert truncated.startswith("broken.nii.gz: ") and "truncated" in truncated  # read by the model: its message
    assert flat_detail.startswith("flat.nii.gz: a 2D image, but the model is 3D")
    assert (plain.status_code, no_file.status_code) == (415, 400)
    assert [row["status"] for row in log_rows(tmp_path)][:len(cases)] == [c[3] for c in cases.values()]


def test_bad_zips(tmp_path: Path) -> None:
    from medseg.data.synthetic_dicom import write_series

    both = tmp_path / "both"
    write_series(both / "one", np.round(volume((8, 8, 4))), AFFINE, series_uid="1.2.3.1")
    write_series(both / "two", np.round(volume((8, 8, 4), 1)), AFFINE, series_uid="1.2.3.2")
    (tmp_path / "nothing").mkdir()
    slip = io.BytesIO()
    with zipfile.ZipFile(slip, "w") as archive:
        archive.writestr("../../escaped.dcm", b"x" * 200)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.dcm", b"\x00" * (8 * 1024 * 1024))
    with serving(tmp_path, FakeModel(), max_upload_mb=1) as client:
        several = post(client, zip_of(both), "two.zip")
        slipped = post(client, slip.getvalue(), "evil.zip")
        bombed = post(client, bomb.getvalue(), "bomb.zip")
        empty = post(client, zip_of(tmp_path / "nothing", {"readme.txt": b"hello"}), "empty.zip")
        assert client.get("/health").status_code == 200
    assert len(bomb.getvalue()) < 1024 * 1024  # the zip itself is under the upload limit
    assert (several.status_code, several.json()["error"]) == (422, "bad_image")
    assert "series" in several.json()["detail"] and several.json()["detail"].startswith("two.zip")
    assert (slipped.status_code, slipped.json()["error"]) == (400, "bad_request")
    assert "../../escaped.dcm" in slipped.json()["detail"]
    assert (bombed.status_code, bombed.json()["error"]) == (413, "too_large")
    assert empty.status_code == 422
    assert not list(tmp_path.parent.rglob("escaped.dcm"))


async def _endless(counter: list[int]) -> Any:
    yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.nii\"\r\n\r\n"
    while True:
        counter[0] += 1
        yield b"\x00" * 65536


def test_size_limit_is_enforced_while_streaming(tmp_path: Path) -> None:
    import anyio

    counter = [0]
    headers = {"content-type": "multipart/form-data; boundary=b"}
    with pytest.raises(UploadRejected) as refused:
        anyio.run(receive_upload, headers, _endless(counter), tmp_path, 1024 * 1024)
    assert refused.value.status == 413
    assert counter[0] <= 1024 * 1024 // 65536 + 2  # stopped right after the limit, not at the end of the body
    assert (tmp_path / "upload.bin").stat().st_size <= 1024 * 1024
    declared = {**headers, "content-length": str(10**12)}
    with pytest.raises(UploadRejected, match="larger than the limit"):
        anyio.run(receive_upload, declared, _endless([0]), tmp_path, 1024 * 1024)


def test_internal_errors_are_500_and_counted(tmp_path: Path) -> None:
    scan = nifti_bytes(tmp_path, volume())
    with serving(tmp_path, FakeModel(fail=RuntimeError("out of luck"))) as client:
        answers = [post(client, scan) for _ in range(2)]
        samples = parse_metrics(client.get("/metrics").text)
        assert client.get("/health").json()["status"] == "ok"
    assert [a.status_code for a in answers] == [500, 500]
    assert answers[0].json()["error"] == "internal_RuntimeError" and "out of luck" in answers[0].json()["detail"]
    assert samples["medseg_errors_total", frozenset({("kind", "internal_RuntimeError")})] == 2
    assert list((tmp_path / "temp").iterdir()) == []  # the temporary folder went at shutdown


def test_queue_full_is_503_with_retry_after(tmp_path: Path) -> None:
    scan = nifti_bytes(tmp_path, volume())
    gate = threading.Event()
    model = FakeModel(gate=gate)
    answers: list[Any] = []
    with serving(tmp_path, model, workers=1, queue=1, retry_after_s=7) as client:
        service = client.app.state.service
        threads = [threading.Thread(target=lambda: answers.append(post(client, scan))) for _ in range(2)]
        threads[0].start()
        assert model.started.acquire(timeout=10)  # the first prediction holds the only worker
        threads[1].start()
        deadline = time.monotonic() + 10
        while service.queue.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (service.queue.running, service.queue.depth) == (1, 1)
        assert client.get("/health").json()["queue_depth"] == 1
        refused = post(client, scan)
        gate.set()
        for thread in threads:
            thread.join(10)
        after = post(client, scan)
    assert (refused.status_code, refused.json()["error"], refused.headers["retry-after"]) == (503, "busy", "7")
    assert sorted(a.status_code for a in answers) == [200, 200] and after.status_code == 200
    assert [row["status"] for row in log_rows(tmp_path)].count("busy") == 1


# ------------------------------------------------------------------------------------------ files and host


def test_nothing_is_written_outside_the_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from medseg.data.synthetic_dicom import write_series

    write_series(tmp_path / "inputs" / "series", np.round(volume((8, 8, 4))), AFFINE)
    data = zip_of(tmp_path / "inputs" / "series")
    scan = nifti_bytes(tmp_path / "inputs", volume())
    system_temp, cwd = tmp_path / "systemp", tmp_path / "cwd"
    system_temp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    monkeypatch.chdir(cwd)
    with serving(tmp_path, FakeModel(), temp_root=None, max_upload_mb=2) as client:
        workdir = client.app.state.service.workdir
        assert workdir.parent == system_temp
        assert post(client, scan, "../../../escape.nii.gz").status_code == 200
        assert post(client, data, "/tmp/escape.zip").status_code == 200
        assert post(client, b"\x00" * (3 * 1024 * 1024), "big.nii").status_code == 413
        assert post(client, scan[:300], "cut.nii.gz").status_code == 422
        assert [p for p in system_temp.iterdir()] == [workdir]
        assert list(cwd.iterdir()) == []
    assert list(system_temp.iterdir()) == []  # removed at shutdown
    assert not list(tmp_path.rglob("escape*"))


def test_serve_command_binds_the_given_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from medseg.commands import serve

    with serving(tmp_path, FakeModel()) as client:
        default = serve.server_config(client.app, serve.parser().parse_args(["--model", "m"]))
        given = serve.server_config(client.app, serve.parser().parse_args(["--model", "m", "--host", "10.1.2.3",
                                                                           "--port", "9123"]))
    assert (default.host, default.port, default.workers) == ("127.0.0.1", 8000, 1)
    assert (given.host, given.port) == ("10.1.2.3", 9123)
    options = serve.serve_options(serve.parser().parse_args(
        ["--model", "a", "--model", "b", "--split", "0.2", "--queue", "0", "--log", "", "--max-upload-mb", "3"]))
    assert (options.split, options.queue, options.log, options.max_upload_bytes) == (0.2, 0, None, 3 * 1024 * 1024)
    # serve's own bound on what an upload may claim (far below predict's 1e9), documented in --help
    assert (options.max_voxels, options.max_voxels_in_flight, options.upload_timeout_s) == (2**27, None, 60.0)
    assert "134,217,728" in serve.parser().format_help()
    for option, value in (("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"), ("--max-upload-mb", "0"),
                          ("--upload-timeout", "-1"), ("--queue", "nan"), ("--max-voxels", "1.5")):
        with pytest.raises(SystemExit):
            serve.parser().parse_args(["--model", "m", option, value])
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # the deploy extra not installed
    from medseg.commands.common import CommandError

    with pytest.raises(CommandError, match=r'pip install "medseg\[deploy\]"'):
        serve.run(["--model", str(tmp_path)])


def test_log_with_other_columns_is_refused(tmp_path: Path) -> None:
    from medseg.errors import InputError

    (tmp_path / "log.csv").write_text("time,request,other\n")
    with pytest.raises(InputError, match="other columns"):
        create_app([FakeModel()], ServeOptions(log=tmp_path / "log.csv", temp_root=tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]  # refused before any folder was made


# ------------------------------------------------------------------------------------------ hardening


def _zeros_gz(shape: tuple[int, ...]) -> bytes:
    """A ``.nii.gz`` of uint8 zeros: a few KB that expand to ``prod(shape)`` voxels (a gzip bomb)."""
    return gzip.compress(nib.Nifti1Image(np.zeros(shape, np.uint8), np.eye(4)).to_bytes(), compresslevel=9)


def _claim_gz(shape: tuple[int, ...], size: int) -> bytes:
    """A ``.nii.gz`` whose header claims ``shape`` (uint8), ``size`` bytes long, holding no voxels at all: enough
    compressed bytes for the claim to be possible, so only the voxel limit can refuse it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    return gzip.compress(header.binaryblock + b"\0" * 4) + gzip.compress(np.random.default_rng(0).bytes(size), 0)


def test_a_gzip_bomb_is_refused_by_the_voxel_limit(tmp_path: Path) -> None:
    bomb = _zeros_gz((160, 160, 160))  # the reviewer's: 4,096,000 voxels in a few KB
    claim = _claim_gz((600, 600, 600), 220_000)  # 216,000,000 voxels claimed, more than serve's default limit
    assert len(bomb) < 20_000 and len(claim) < 230_000
    with serving(tmp_path, FakeModel(), max_voxels=1_000_000) as client:
        small_limit = post(client, bomb, "bomb.nii.gz")
    with serving(tmp_path, FakeModel()) as client:  # serve's default --max-voxels
        default_limit = post(client, claim, "claim.nii.gz")
    assert (small_limit.status_code, small_limit.json()["error"]) == (422, "bad_image")
    assert "4,096,000 voxels, more than the limit of 1,000,000" in small_limit.json()["detail"]
    assert default_limit.status_code == 422
    assert "216,000,000 voxels, more than the limit of 134,217,728" in default_limit.json()["detail"]


def test_voxels_in_flight_are_bounded_across_workers() -> None:
    from medseg.serve.workers import WorkQueue

    queue = WorkQueue(workers=2, queue=0, max_voxels=100)
    gate, started = threading.Event(), []

    def job(name: str) -> str:
        started.append(name)
        assert gate.wait(10)
        return name

    async def main() -> list[str]:
        first = asyncio.create_task(queue.run(queue.admit(), job, "big", voxels=80))
        while queue.running < 1:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(queue.run(queue.admit(), job, "second", voxels=50))
        await asyncio.sleep(0.1)  # a free worker, but 80 + 50 voxels > 100: it waits for the first
        waiting = (list(started), queue.running, queue.voxels, queue.depth)
        gate.set()
        return [waiting, await first, await second]

    waiting, *done = asyncio.run(main())
    queue.close()
    assert waiting == (["big"], 1, 80, 1) and done == ["big", "second"]
    assert (queue.voxels, queue.running) == (0, 0)


def test_a_cancelled_waiting_prediction_frees_its_place() -> None:
    from medseg.serve.workers import QueueFull, WorkQueue

    queue = WorkQueue(workers=1, queue=1)
    gate = threading.Event()

    async def request(slot: Any) -> None:
        with slot:
            await queue.run(slot, gate.wait, 10)

    async def main() -> tuple[int, int, bool]:
        running = asyncio.create_task(request(queue.admit()))
        while queue.running < 1:
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(request(queue.admit()))
        await asyncio.sleep(0.02)
        assert queue.full()
        waiting.cancel()  # the client left while its prediction waited for the worker
        await asyncio.gather(waiting, return_exceptions=True)
        freed = (queue.admitted, queue.depth, queue.full())
        gate.set()
        await running
        return freed

    assert asyncio.run(main()) == (1, 0, False)  # the running one keeps its place; the cancelled one's is free
    assert queue.admitted == 0
    queue.close()
    single = WorkQueue(workers=1, queue=0)
    single.admit()
    with pytest.raises(QueueFull):
        single.admit()


def test_a_full_server_refuses_an_upload_before_reading_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.serve import uploads

    scan = nifti_bytes(tmp_path, volume())
    receive, reading, release = uploads.receive_upload, threading.Event(), threading.Event()
    calls: list[str] = []

    async def slow_receive(*args: Any, **kwargs: Any) -> Any:  # an upload that is still arriving
        calls.append("receive")
        reading.set()
        while not release.is_set():
            await asyncio.sleep(0.005)
        return await receive(*args, **kwargs)

    monkeypatch.setattr(uploads, "receive_upload", slow_receive)
    answers: list[Any] = []
    with serving(tmp_path, FakeModel(), workers=1, queue=0, retry_after_s=3) as client:
        thread = threading.Thread(target=lambda: answers.append(post(client, scan, case="first")))
        thread.start()
        assert reading.wait(10)
        health = client.get("/health").json()  # the upload in progress holds the only place
        refused = post(client, scan, case="second")
        release.set()
        thread.join(10)
    assert (health["queue_depth"], health["running"]) == (1, 0)
    assert (refused.status_code, refused.json()["error"], refused.headers["retry-after"]) == (503, "busy", "3")
    assert calls == ["receive"] and answers[0].status_code == 200  # the second body was never read
    assert [(row["case"], row["status"]) for row in log_rows(tmp_path)] == [("", "busy"), ("first", "ok")]


async def _slow(chunks: list[bytes], pause: float) -> Any:
    for chunk in chunks:
        await asyncio.sleep(pause)
        yield chunk


async def _leaving() -> Any:
    from starlette.requests import ClientDisconnect

    yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.nii\"\r\n\r\nabc"
    raise ClientDisconnect()


def test_a_slow_upload_times_out_and_a_leaving_client_is_not_a_bad_form(tmp_path: Path) -> None:
    import anyio
    from starlette.requests import ClientDisconnect

    headers = {"content-type": "multipart/form-data; boundary=b"}
    head = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.nii\"\r\n\r\n"
    start = time.monotonic()
    with pytest.raises(UploadRejected) as slow:
        anyio.run(receive_upload, headers, _slow([head, b"x", b"y", b"z"], 0.1), tmp_path, 1024, 0.25)
    assert (slow.value.status, slow.value.kind) == (408, "timeout") and "0.25 s" in slow.value.reason
    assert time.monotonic() - start < 1.0
    with pytest.raises(ClientDisconnect):  # passed on, so the app logs "disconnected", not "bad_request"
        anyio.run(receive_upload, headers, _leaving(), tmp_path, 1024)


def test_ids_from_headers_and_form_fields_are_one_text(tmp_path: Path) -> None:
    scan = nifti_bytes(tmp_path, volume())
    nfc, nfd = "Müller-Çelik", "Mu\u0308ller-C\u0327elik"  # one name, composed and decomposed
    with serving(tmp_path, FakeModel("a"), FakeModel("b")) as client:
        by_header = client.post("/predict", files={"file": ("s.nii.gz", scan)},
                                headers={"X-Patient-Id": nfc.encode("utf-8"), "X-Case-Id": b" c\xc3\xa9 "}).json()
        by_form = post(client, scan, patient=f" {nfd} ", case="cé")
    router = Router([FakeModel("a"), FakeModel("b")], 0.5)
    assert by_header["model"] == by_form.json()["model"] == router.choose(nfc).name
    assert (by_header["patient"], by_header["case"]) == (by_form.json()["patient"], by_form.json()["case"]) == (nfc, "cé")
    rows = log_rows(tmp_path)
    assert [(row["patient"], row["case"]) for row in rows] == [(nfc, "cé"), (nfc, "cé")]
    # TestClient re-encodes header values, so bytes that are not UTF-8 are checked where they are read
    from medseg.serve.uploads import header_value, identifier

    raw = [(b"x-patient-id", b"\xff\xfe"), (b"x-case-id", b"c\xc3\xa9")]
    assert identifier(header_value(raw, b"x-case-id"), "header X-Case-Id") == "cé"
    with pytest.raises(UploadRejected, match="header X-Patient-Id: not UTF-8") as refused:
        identifier(header_value(raw, b"x-patient-id"), "header X-Patient-Id")
    assert (refused.value.status, refused.value.kind) == (400, "bad_request")


def test_without_ids_requests_are_routed_by_request(tmp_path: Path) -> None:
    scan = nifti_bytes(tmp_path, volume())
    with serving(tmp_path, FakeModel("a"), FakeModel("b")) as client:
        answers = [post(client, scan, "image.nii.gz").json() for _ in range(16)]
    router = Router([FakeModel("a"), FakeModel("b")], 0.5)
    assert {body["model"] for body in answers} == {"a", "b"}  # one arm only: chance 2**-15
    assert all(body["model"] == router.choose(body["request"]).name for body in answers)
    assert {row["case"] for row in log_rows(tmp_path)} == {"image"}  # still logged as the case


def test_log_cells_are_not_formulas(tmp_path: Path) -> None:
    from medseg.serve.requests_log import text_from_cell

    scan = nifti_bytes(tmp_path, volume())
    tricky = {"patient": "=HYPERLINK(\"http://x\")", "case": "@SUM(A1)"}
    with serving(tmp_path, FakeModel("-model")) as client:
        body = post(client, scan, **tricky).json()
        quoted = post(client, scan, patient="'quoted", case="+1").json()
    with open(tmp_path / "log.csv", newline="") as handle:
        cells = list(csv.reader(handle))
    header, rows = cells[0], cells[1:]
    text = [header.index(c) for c in ("case", "patient", "model")]
    assert [[row[i] for i in text] for row in rows] == [
        ["'@SUM(A1)", "'=HYPERLINK(\"http://x\")", "'-model"], ["'+1", "''quoted", "'-model"]]
    assert float(rows[0][header.index("volume_ml_organ")]) > 0  # numbers stay numbers
    assert [text_from_cell(rows[1][i]) for i in text] == ["+1", "'quoted", "-model"]
    assert (body["patient"], quoted["patient"]) == (tricky["patient"], "'quoted")  # the answer: the id as sent


def test_zip_members_without_a_name_are_refused(tmp_path: Path) -> None:
    from medseg.serve.zipped import unsafe_member

    answers = []
    with serving(tmp_path, FakeModel()) as client:
        for name in (".", "./", "a/.."):
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:
                archive.writestr(zipfile.ZipInfo(name), b"x" * 200)
            answers.append(post(client, buffer.getvalue(), "odd.zip"))
    assert [(a.status_code, a.json()["error"]) for a in answers[::2]] == [(400, "bad_request")] * 2
    assert answers[1].status_code in (400, 422)  # "./" is a folder entry: skipped, an empty series
    assert unsafe_member("") and unsafe_member(".") and not unsafe_member("study/./a.dcm")
