"""The viewer of ``medseg serve``: the data it is sent (``view.json``) and the page in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.data.io import read_image, write_nifti
from medseg.serve.app import create_app
from medseg.serve.results import Result
from medseg.serve.service import ServeOptions
from tests.test_serve import FakeModel, post, serving

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def decode(view: dict, key: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(view[key]), dtype=np.uint8).reshape(view["shape"])


def test_view_json_is_radiological_axial(tmp_path: Path) -> None:
    # voxel (i, j, k) lies at x = -2i (i = 0 is the patient's right-most), y = -2j (j = 0 the most anterior),
    # z = 3k (k = 0 the lowest): on the first axial slice, voxel (0, 0, 0) must be drawn top left and
    # voxel (5, 0, 0) top right (radiological view: the patient's right on the left, anterior at the top)
    image = np.zeros((6, 5, 4), np.float32)
    image[0, 0, 0], image[5, 0, 0] = 100.0, 5.0  # FakeModel: label 2 and label 1
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    data = write_nifti(image, affine, tmp_path / "scan.nii.gz").read_bytes()
    with serving(tmp_path, FakeModel()) as client:
        result = post(client, data, case="v1").json()["result"]
        view = client.get(f"/results/{result}/view.json").json()
        assert client.get("/results/0123456789abcdef0123456789abcdef/view.json").status_code == 404
    assert view["shape"] == [4, 5, 6] and view["spacing_mm"] == [3.0, 2.0, 2.0]
    labels, pixels = decode(view, "labels"), decode(view, "image")
    expected = np.zeros((4, 5, 6), np.uint8)
    expected[0, 0, 0], expected[0, 0, 5] = 2, 1
    np.testing.assert_array_equal(labels, expected)
    assert pixels[0, 0, 0] == 255 and pixels[1:].max() == 0
    assert view["label_names"] == ["background", "organ", "core"] and view["summary"]["case"] == "v1"


def test_view_json_of_a_2d_image(tmp_path: Path) -> None:
    image = np.zeros((7, 3), np.float32)  # (x, y): 7 columns, 3 rows
    image[6, 0] = 100.0
    data = write_nifti(image, np.diag([0.5, 0.25, 1.0, 1.0]), tmp_path / "plane.nii.gz").read_bytes()
    png = io.BytesIO()
    Image.fromarray(image.T.astype(np.uint8)).save(png, format="PNG")  # rows = y: the same picture
    with serving(tmp_path, FakeModel(spatial_dims=2)) as client:
        body = post(client, data, "plane.nii.gz").json()
        view = client.get(f"/results/{body['result']}/view.json").json()
        from_png = post(client, png.getvalue(), "plane.png").json()
        png_view = client.get(f"/results/{from_png['result']}/view.json").json()
    assert view["shape"] == [1, 3, 7] and view["spacing_mm"] == [1.0, 0.25, 0.5]
    assert decode(view, "labels")[0, 0, 6] == 2 and decode(view, "labels").sum() == 2
    assert body["structures"]["core"]["area_mm2"] == pytest.approx(0.125)
    assert (from_png["input"], png_view["shape"], png_view["spacing_mm"]) == ("png", [1, 3, 7], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(decode(png_view, "labels"), decode(view, "labels"))


def _result(tmp_path: Path, labels: np.ndarray, names: list[str]) -> Result:
    folder = tmp_path / "0123456789abcdef0123456789abcdef"
    folder.mkdir()
    labels_file = write_nifti(labels, np.diag([1.0, 1.0, 2.0, 1.0]), folder / "labels.nii.gz", dtype=np.int16)
    return Result(folder.name, folder, {"case": "v"}, "nifti", 3, names, {"labels": labels_file})


def test_view_json_is_made_once_under_concurrent_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.serve import results

    labels = np.zeros((6, 5, 4), np.int16)
    labels[1:3, 1:3, 1] = 1
    result = _result(tmp_path, labels, ["background", "organ"])
    made, view = [], results._view

    def slow_view(result: Result) -> dict:  # a slow computation: the window the reviewer's requests raced in
        made.append(1)
        time.sleep(0.05)
        return view(result)

    monkeypatch.setattr(results, "_view", slow_view)
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(results.view_data(result))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(made) == 1 and len(answers) == 8 and all(answer == answers[0] for answer in answers)
    assert sorted(p.name for p in result.folder.iterdir()) == ["labels.nii.gz", "view.json"]  # no temporary left
    assert decode(answers[0], "labels").sum() == 4


def test_view_json_keeps_labels_above_255(tmp_path: Path) -> None:
    from medseg.serve.results import view_data

    labels = np.zeros((6, 5, 4), np.int16)
    labels[0, 0, 0], labels[5, 0, 0] = 300, 7
    view = view_data(_result(tmp_path, labels, [f"class{k}" for k in range(301)]))
    shown = np.frombuffer(base64.b64decode(view["labels"]), dtype="<u2").reshape(view["shape"])
    assert view["labels_dtype"] == "uint16"
    assert sorted(np.unique(shown).tolist()) == [0, 7, 300] and (shown == 300).sum() == 1


@contextmanager
def live_server(model: FakeModel, tmp_path: Path) -> Iterator[str]:
    """A real uvicorn server of an app serving ``model`` on a free localhost port, in a thread."""
    import uvicorn

    app = create_app([model], ServeOptions(log=None, temp_root=tmp_path))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium/chromium-browser/google-chrome binary on PATH")
def test_uploaded_case_shows_its_overlay_in_chromium(seg3d_root: Path, tmp_path: Path) -> None:
    import httpx

    image = sorted((seg3d_root / "imagesTr").glob("*.nii.gz"))[0]
    truth = seg3d_root / "labelsTr" / image.name
    model = FakeModel("perfect", truth=truth, label_names=("background", "structure1"))
    with live_server(model, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        answer = http.post("/predict", files={"file": (image.name, image.read_bytes())}, data={"patient": "p1"})
        assert answer.status_code == 200, answer.text
        assert http.get("/").text.count("viewer.js") == 1 and http.get("/static/viewer.js").status_code == 200
        body = answer.json()
        screenshot = tmp_path / "viewer.png"
        page = f"{url}/?demo={body['result']}"
        base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=10000", "--window-size=1280,800", "--hide-scrollbars"]
        subprocess.run([*base, f"--screenshot={screenshot}", page], capture_output=True, timeout=120, check=True)
        dom = subprocess.run([*base, "--dump-dom", page], capture_output=True, text=True, timeout=120,
                             check=True).stdout
    print(f"viewer screenshot: {screenshot}")
    if os.environ.get("MEDSEG_KEEP_ARTIFACTS"):
        kept = Path(__file__).parent / "artifacts" / "viewer.png"
        kept.parent.mkdir(exist_ok=True)
        shutil.copy(screenshot, kept)
    with Image.open(screenshot) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    # label 1 (230, 25, 75) at 50% opacity over grey v: (v/2 + 115, v/2 + 12.5, v/2 + 37.5)
    overlay = (np.abs(rgb[..., 0] - rgb[..., 1] - 102.5) <= 4) & (np.abs(rgb[..., 0] - rgb[..., 2] - 77.5) <= 4)
    # the page opens on the slice with the most foreground, drawn 512 px wide for the image's width
    labels = read_image(truth, np.int16)[0]
    nx, ny = labels.shape[:2]
    spacing = np.abs(np.diag(nib.load(truth).affine))[:2]
    scale = 512 / max(nx * spacing[0], ny * spacing[1])
    expected = (labels == 1).sum(axis=(0, 1)).max() * spacing[0] * spacing[1] * scale**2
    assert abs(overlay.sum() - expected) < 0.1 * expected, (overlay.sum(), expected)
    volume = f"{body['structures']['structure1']['volume_ml']:.3f}"
    assert "perfect (arm A)" in dom and volume in dom and "structure1 (1)</label>" in dom  # present, not "— none"
    assert f"/results/{body['result']}/labels.nii.gz" in dom
