"""Load test of `medseg serve`: N concurrent clients for a bounded time, good and bad uploads mixed, every answer
checked.

Starts `medseg serve` (a subprocess, the real command) on a free localhost port with ``--model DIR`` (an export
folder or a checkpoint), or with ``--synthetic-model`` a 3D U-Net trained one step on a synthetic dataset and
exported; or targets a running server with ``--url``. The good uploads are synthetic 3D NIfTI cases (``--size``);
a share ``--bad-rate`` of the uploads is bad, in turn: random bytes, a text file, a truncated .nii.gz, a 2D
image, a zip with a path-traversal name, an upload over the size limit.

Checks: every good answer is a label map (``?return=file``) that parses, has the input's shape and affine, and
whose voxel counts agree with the summary in ``X-Medseg-Summary``, which names the case that was sent; every bad
upload gets its 4xx; no request is lost (a transport error or timeout counts as lost); the server's
``/metrics`` counts as many requests as were sent, and its request log has one row each. A 503 (the server's
queue is full) is retried after its ``Retry-After`` (at most ``--retries`` times, waits capped at 10 s); the
share of 503 answers is reported, and uploads still refused after the retries count against
``--max-refused-share``. Exit 1 when an answer was lost, garbled or wrong, or too many uploads stayed refused.

    python scripts/load_serve.py --synthetic-model [--clients 4] [--duration 30] [--bad-rate 0.2]
    python scripts/load_serve.py --model exported/ [--workers 1] [--queue 8] [--size 48 48 24]
    python scripts/load_serve.py --url http://127.0.0.1:8000 [--max-upload-mb 512]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

CONFIG = Path(__file__).parents[1] / "configs" / "seg3d_unet.yaml"
BAD_KINDS = {"random bytes": 415, "text file": 415, "truncated nifti": 422, "2D image": 422, "zip slip": 400,
             "too large": 413}


@dataclass
class Case:
    """One good upload: its bytes and the shape and affine its label map must have."""

    name: str
    data: bytes
    shape: tuple[int, ...]
    affine: np.ndarray


@dataclass
class Tally:
    """What the clients saw (appended under a lock)."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {"good": [], "bad": []})
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    sent: int = 0
    lost: int = 0
    uploads: int = 0
    retried: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def synthetic_model(work: Path, size: list[int]) -> Path:
    """A 3D U-Net trained one step on a synthetic dataset of ``size`` cases, exported (TorchScript)."""
    from medseg.data.synthetic import make_synthetic
    from medseg.deploy.export import export_model
    from medseg.lightning_cli import MedSegCLI
    from medseg.resume import saved_checkpoint

    root = make_synthetic(work / "data", dims=3, cases=4, classes=3, task="seg", size=size, seed=0).parent
    patch = [min(s, 32) // 16 * 16 or 16 for s in size]
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIG), "--data.root", str(root), "--trainer.default_root_dir", str(work / "runs"),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.patch_size", str(patch),
        "--model.init_args.network_args", str({"channels": [8, 16, 32]}), "--trainer.enable_model_summary", "false",
    ])
    return export_model([saved_checkpoint(cli.trainer)], work / "seg3d_synthetic", bundle=False)


def good_cases(work: Path, size: list[int], count: int = 4) -> list[Case]:
    from medseg.data.synthetic import make_synthetic

    root = make_synthetic(work / "uploads", dims=3, cases=count, classes=3, task="seg", size=size, seed=7).parent
    cases = []
    for path in sorted((root / "imagesTr").glob("*.nii.gz")):
        image = nib.load(path)
        cases.append(Case(path.name, path.read_bytes(), tuple(image.shape), image.affine))
    return cases


def bad_upload(kind: str, case: Case, max_bytes: int, rng: random.Random) -> tuple[str, bytes]:
    if kind == "random bytes":
        return "noise.nii.gz", rng.randbytes(4096)
    if kind == "text file":
        return "notes.txt", b"patient notes, not an image\n" * 40
    if kind == "truncated nifti":
        return "cut.nii.gz", case.data[: len(case.data) // 2]
    if kind == "2D image":
        buffer = io.BytesIO()
        image = nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4))
        buffer.write(gzip.compress(image.to_bytes()))
        return "flat.nii.gz", buffer.getvalue()
    if kind == "zip slip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("../../../etc/evil.dcm", b"x" * 256)
        return "evil.zip", buffer.getvalue()
    return "big.nii", b"\0" * (int(max_bytes) + 256 * 1024)


def check_good(answer: httpx.Response, case: Case, case_id: str) -> str | None:
    """Why a good upload's answer is wrong, or ``None``."""
    if answer.status_code != 200:
        return f"{case_id}: status {answer.status_code}: {answer.text[:200]}"
    try:
        summary = json.loads(answer.headers["x-medseg-summary"])
        labels = nib.Nifti1Image.from_bytes(gzip.decompress(answer.content))
        array = np.asarray(labels.dataobj)
    except Exception as err:  # a garbled answer
        return f"{case_id}: unreadable answer ({type(err).__name__}: {err})"
    if summary.get("case") != case_id:
        return f"{case_id}: the answer is for case {summary.get('case')!r}"
    if array.shape != case.shape or not np.allclose(labels.affine, case.affine, atol=1e-4):
        return f"{case_id}: label map {array.shape} / affine differ from the input's {case.shape}"
    for name, structure in summary["structures"].items():
        label = structure["label"]
        if int((array == label).sum()) != structure["voxels"]:
            return f"{case_id}: {name}: {int((array == label).sum())} voxels in the map, {structure['voxels']} in the summary"
    return None


def client(url: str, cases: list[Case], args: argparse.Namespace, index: int, deadline: float, tally: Tally) -> None:
    """One client's loop; a failure of the client itself is a problem of the run, not a silent stop."""
    try:
        _client(url, cases, args, index, deadline, tally)
    except Exception as err:
        with tally.lock:
            tally.failures.append(f"client {index} stopped: {type(err).__name__}: {err}")


def _client(url: str, cases: list[Case], args: argparse.Namespace, index: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(1000 + index)
    kinds = list(BAD_KINDS)
    with httpx.Client(base_url=url, timeout=120) as http:
        n = bad_count = 0
        while time.monotonic() < deadline:
            n += 1
            case = cases[rng.randrange(len(cases))]
            bad = rng.random() < args.bad_rate
            bad_count += bad
            kind = kinds[(bad_count + index) % len(kinds)] if bad else "good"  # each kind in turn
            case_id = f"c{index}-{n}"
            name, data = bad_upload(kind, case, args.max_upload_mb * 1024 * 1024, rng) if bad else (case.name, case.data)
            patient = f"p{rng.randrange(50)}"
            for attempt in range(args.retries + 1):
                start = time.perf_counter()
                try:
                    answer = http.post("/predict", params={"return": "file"}, files={"file": (name, data)},
                                       data={"case": case_id, "patient": patient})
                except httpx.HTTPError as err:
                    answer = None
                    with tally.lock:
                        tally.sent += 1
                        tally.lost += 1
                        tally.failures.append(f"{case_id} ({kind}): lost: {type(err).__name__}: {err}")
                    break
                if answer.status_code != 503 or attempt == args.retries or time.monotonic() >= deadline:
                    break
                with tally.lock:  # the queue was full: an answer, counted, then retried as the server asks
                    tally.sent += 1
                    tally.retried += 1
                    tally.statuses[503] += 1
                time.sleep(retry_after(answer))
            with tally.lock:
                tally.uploads += 1
            if answer is None:
                continue
            seconds = time.perf_counter() - start
            problem = check_good(answer, case, case_id) if not bad else (
                None if answer.status_code == BAD_KINDS[kind] else
                f"{case_id} ({kind}): status {answer.status_code}, expected {BAD_KINDS[kind]}: {answer.text[:200]}")
            with tally.lock:
                tally.sent += 1
                tally.statuses[answer.status_code] += 1
                if answer.status_code == 503:  # still refused after the retries: counted, not a wrong answer
                    tally.refused += 1
                    continue
                tally.latencies["bad" if bad else "good"].append(seconds)
                if problem:
                    tally.failures.append(problem)


def retry_after(answer: httpx.Response) -> float:
    """The seconds a 503 asks to wait (``Retry-After``), between 0.1 and 10; 1 when it says nothing usable."""
    try:
        seconds = float(answer.headers.get("retry-after", "1"))
    except ValueError:
        seconds = 1.0
    return min(10.0, max(0.1, seconds)) if seconds == seconds else 1.0


def start_server(model: Path, work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "medseg", "serve", "--model", str(model), "--port", str(port), "--log",
               str(work / "requests.csv"), "--max-upload-mb", str(args.max_upload_mb), "--workers",
               str(args.workers), "--queue", str(args.queue), "--device", args.device]
    server = subprocess.Popen(command, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"medseg serve stopped: {(work / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.3)
    server.kill()
    sys.exit("medseg serve did not answer /health within 120 s")


def requests_counted(url: str) -> int:
    total = 0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("medseg_requests_total{"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(tally: Tally, seconds: float, model: str, url: str, args: argparse.Namespace, cases: list[Case]) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    lines = [f"machine: {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, "
             f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
             f"model: {model}; input {'x'.join(map(str, cases[0].shape))} NIfTI ({len(cases[0].data) / 1024:.0f} KiB); "
             f"server {url} --workers {args.workers} --queue {args.queue}",
             f"load: {args.clients} clients for {seconds:.1f} s, {args.bad_rate:.0%} bad uploads", "",
             f"{'uploads':<10}{'requests':>10}{'p50 s':>10}{'p95 s':>10}{'per s':>10}"]
    for kind, values in tally.latencies.items():
        lines.append(f"{kind:<10}{len(values):>10}{percentile(values, 50):>10.3f}{percentile(values, 95):>10.3f}"
                     f"{len(values) / seconds:>10.2f}")
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(tally.statuses.items()))
    share = tally.statuses[503] / tally.sent if tally.sent else 0.0
    lines += ["", f"status counts: {statuses}; lost: {tally.lost}; wrong answers: {len(tally.failures)}",
              f"503 (busy): {tally.statuses[503]} of {tally.sent} requests ({share:.1%}); {tally.retried} retried "
              f"after Retry-After; {tally.refused} of {tally.uploads} uploads still refused after "
              f"{args.retries} retries"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="an export folder (or a .ckpt) to serve")
    source.add_argument("--synthetic-model", action="store_true", help="train one step on synthetic data, export")
    source.add_argument("--url", help="a running medseg serve")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--bad-rate", type=float, default=0.2, help="share of bad uploads")
    parser.add_argument("--size", type=int, nargs=3, default=[48, 48, 24], help="synthetic case size")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--max-upload-mb", type=float, default=2.0, help="the server's limit (with --url: its own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--retries", type=int, default=5, help="retries of a 503, after its Retry-After")
    parser.add_argument("--max-refused-share", type=float, default=0.1,
                        help="fail when more uploads than this share stay refused (503) after the retries")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medseg-load-") as folder:
        work = Path(folder)
        cases = good_cases(work, args.size)
        server, url, model = None, args.url, args.url
        if not args.url:
            model = synthetic_model(work, args.size) if args.synthetic_model else args.model
            server, url = start_server(model, work, args)
        try:
            counted_before = requests_counted(url)
            tally = Tally()
            start = time.monotonic()
            threads = [threading.Thread(target=client, args=(url, cases, args, i, start + args.duration, tally))
                       for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - start
            counted = requests_counted(url) - counted_before
            print(report(tally, seconds, Path(str(model)).name, url, args, cases))
            problems = list(tally.failures)
            if tally.uploads and tally.refused / tally.uploads > args.max_refused_share:
                problems.append(f"{tally.refused} of {tally.uploads} uploads still refused (503) after "
                                f"{args.retries} retries, more than --max-refused-share {args.max_refused_share}")
            if not tally.latencies["good"]:
                problems.append("no good upload was answered")
            if counted != tally.sent:
                problems.append(f"/metrics counted {counted} requests, the clients sent {tally.sent}")
            if server is not None:
                rows = (work / "requests.csv").read_text().count("\n") - 1
                if rows != tally.sent:
                    problems.append(f"the request log has {rows} rows, the clients sent {tally.sent}")
            print(f"server-side: /metrics counted {counted} requests" +
                  (f", the log {rows} rows" if server is not None else ""))
        finally:
            if server is not None:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(60)
                except subprocess.TimeoutExpired:
                    server.kill()
    for problem in problems[:20]:
        print("PROBLEM:", problem)
    print("OK: every answer checked" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
