"""``medseg ab-report``: request logs written by hand, the numbers checked against scipy/numpy computed here, the
reports parsed back, the refusals; with reference labels, Dice of copied and eroded label maps."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage, stats

from medseg.cli import main
from medseg.data.datalist import load_dataset
from medseg.data.io import read_image, write_nifti
from medseg.evaluation import ab_stats, report
from tests.test_report_render import parse_report

COLUMNS = ["time", "request", "case", "patient", "model", "status", "latency_s", "input", "doubt",
           "volume_ml_liver", "volume_ml_tumour", "prediction"]
# Latencies and volumes of the answered requests; FAST is arm B (its patients hash below the split, see _patients).
FAST, SLOW = "fastnet", "slownet"
LATENCY = {FAST: [0.21, 0.25, 0.19, 0.30, 0.22, 0.27, 0.24], SLOW: [0.41, 0.28, 0.52, 0.47, 0.39, 0.45]}
LIVER = {FAST: [1510.0, 1490.5, 1602.25, 1555.0, 1480.0, 1530.0, 1499.0], SLOW: [1500.0, 1610.0, 1570.5, 1495.0,
                                                                               1620.0, 1588.0]}
TUMOUR = {FAST: [12.5, 8.0, 15.25, 9.5, 11.0, 10.0, 13.0], SLOW: [14.0, 9.0, 16.5, 12.0, 11.5, 15.0]}
ERRORS = {FAST: ["busy", "bad_image", "busy"], SLOW: ["internal_RuntimeError"]}


def _fraction(key: str) -> float:
    """The routing place of a key as the serve log format states it: the first 16 hex digits of its SHA-256."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64


def _patients(below: bool, count: int) -> list[str]:
    """``count`` patient ids whose routing place is below 0.5 (arm B of a 50/50 split) or not."""
    ids = (f"patient{i:03d}" for i in range(1000))
    return [p for p in ids if (_fraction(p) < 0.5) == below][:count]


def _row(model: str, patient: str, case: str, status: str = "ok", latency: float = 0.1, **extra: Any) -> dict:
    return {"time": "2025-01-31T12:00:00.000+00:00", "request": hashlib.md5(f"{case}{model}".encode()).hexdigest(),
            "case": case, "patient": patient, "model": model, "status": status, "latency_s": f"{latency:.4f}",
            "input": "nifti", "doubt": "0.05" if status == "ok" else "", "prediction": "", **extra}


def _write_log(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _handmade_rows(shared: str | None = None) -> list[dict]:
    rows = []
    for model, below in ((SLOW, False), (FAST, True)):
        n_ok = len(LATENCY[model])
        for i, patient in enumerate(_patients(below, n_ok + len(ERRORS[model]))):
            case = f"{model}_{i:02d}"
            if i < n_ok:
                rows.append(_row(model, patient, case, latency=LATENCY[model][i], volume_ml_liver=LIVER[model][i],
                                 volume_ml_tumour=TUMOUR[model][i]))
            else:
                rows.append(_row(model, patient, case, status=ERRORS[model][i - n_ok], latency=0.01))
    if shared:  # one patient served by both arms: a failed request of the slow arm for a patient of the fast one
        rows.append(_row(SLOW, shared, "shared_case", status="bad_request", latency=0.01))
    return rows


@pytest.fixture(scope="module")
def handmade(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    log = _write_log(tmp_path_factory.mktemp("ab") / "serve_requests.csv", _handmade_rows())
    assert main(["ab-report", str(log)]) == 0
    out = log.parent / "ab_report"
    return {"out": out, "summary": json.loads((out / "ab_summary.json").read_text())}


def _cliffs_delta(a: list[float], b: list[float]) -> float:
    """P(a > b) − P(a < b) over all pairs, counted directly."""
    return float(np.sign(np.subtract.outer(a, b)).mean())


def test_summary_numbers_match_scipy(handmade: dict[str, Any]) -> None:
    summary = handmade["summary"]
    assert summary["arms"] == [SLOW, FAST] and summary["routed"]  # the fast arm's keys hash below the split
    for model in (SLOW, FAST):
        arm = summary["per_arm"][model]
        assert arm["ok"] == len(LATENCY[model]) and arm["requests"] == len(LATENCY[model]) + len(ERRORS[model])
        assert arm["errors"] == {k: ERRORS[model].count(k) for k in set(ERRORS[model])}
        latency = arm["latency_s"]
        assert latency["median"] == pytest.approx(np.median(LATENCY[model]))
        assert latency["p95"] == pytest.approx(np.percentile(LATENCY[model], 95))
        assert latency["mean"] == pytest.approx(np.mean(LATENCY[model]))
        # the CI is the benchmark report's bootstrap of the mean, number for number
        assert (latency["ci_low"], latency["ci_high"]) == pytest.approx(report.bootstrap_ci(np.array(LATENCY[model])))
    by_title = {c["title"]: c for c in summary["comparisons"]}
    lat = by_title["Latency"]
    test = stats.mannwhitneyu(LATENCY[SLOW], LATENCY[FAST], alternative="two-sided")
    assert lat["p"] == pytest.approx(test.pvalue) and lat["p_holm"] == pytest.approx(test.pvalue)  # family of one
    assert lat["effect"] == pytest.approx(_cliffs_delta(LATENCY[SLOW], LATENCY[FAST]))
    assert lat["median_diff"] == pytest.approx(np.median(LATENCY[SLOW]) - np.median(LATENCY[FAST]))
    assert lat["diff_low"] <= lat["median_diff"] <= lat["diff_high"]
    assert lat["better_arm"] == FAST and lat["significant"]
    # the two volumes are one family: Holm over two p-values, computed by hand
    raw = [stats.mannwhitneyu(v[SLOW], v[FAST]).pvalue for v in (LIVER, TUMOUR)]
    low, high = sorted(raw)
    holm = {low: min(1.0, 2 * low), high: max(min(1.0, 2 * low), high)}
    for title, values, p in (("Volume of liver", LIVER, raw[0]), ("Volume of tumour", TUMOUR, raw[1])):
        entry = by_title[title]
        assert entry["unit"] == "ml" and entry["better_arm"] == ""  # a volume has no better direction
        assert entry["p"] == pytest.approx(p) and entry["p_holm"] == pytest.approx(holm[p])
        assert entry["effect"] == pytest.approx(_cliffs_delta(values[SLOW], values[FAST]))
        assert entry["arms"][FAST]["median"] == pytest.approx(np.median(values[FAST]))
    assert summary["shared_patients"] == {"count": 0, "ids": []}


def test_effect_size_and_bootstrap_against_worked_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cliff's delta of a = [1, 2, 3], b = [2, 4]: pairs > : (3,2) = 1; < : (1,2) (1,4) (2,4) (3,4) = 4; ties 1
    assert ab_stats.rank_biserial([1, 2, 3], [2, 4]) == pytest.approx((1 - 4) / 6)
    assert ab_stats.rank_biserial([5, 6], [1, 2, 3]) == 1.0
    same = ab_stats.compare([0.5, 0.5], [0.5, 0.5, 0.5])
    assert same["p"] == 1.0 and same["effect"] == 0.0
    values = np.random.default_rng(3).normal(size=37)
    monkeypatch.setattr(ab_stats, "CHUNK_VALUES", 100)  # many chunks: still the report's numbers
    assert ab_stats.bootstrap_mean_ci(values) == pytest.approx(report.bootstrap_ci(values))


def test_reports_hold_the_arms_and_the_statistics(handmade: dict[str, Any]) -> None:
    out = handmade["out"]
    dom = parse_report((out / "ab_report.html").read_text())
    assert dom.h(1) == ["medseg A/B report"]
    assert dom.h(2) == ["Summary", "Arms", "Comparisons", "Against the reference", "Statistics"]
    arms = dom.body(dom.table("arms-table"))
    assert [row[:2] for row in arms] == [["A", SLOW], ["B", FAST]]
    assert arms[1][4] == "bad_image 1, busy 2" and arms[1][6] == f"{np.median(LATENCY[FAST]):.3f}"
    latency = dom.body(dom.table("table-latency"))  # a row per arm, the test on arm A's row
    assert [row[:3] for row in latency] == [["Latency", "A", "6"], ["", "B", "7"]]
    assert latency[0][3] == f"{np.median(LATENCY[SLOW]):.3f}" and latency[0][-1] == "B" and latency[1][-1] == ""
    volumes = dom.body(dom.table("table-volume"))
    assert [row[0] for row in volumes] == ["liver", "", "tumour", ""] and "Predicted volumes (ml)" in dom.h(3)
    statistics = " ".join(dom.paragraphs)
    for words in ("n = 6 answered requests in arm A", "n = 7 answered requests in arm B", "unpaired",
                  "Mann–Whitney U", "Holm–Bonferroni", "Cliff's delta", "2,000 resamples", "Latency: s",
                  "Predicted volumes: ml"):
        assert words in statistics, words
    assert any(p.startswith(f"Latency (lower is better): {FAST} (arm B) is better") for p in dom.paragraphs)
    markdown = (out / "ab_report.md").read_text()
    for words in ("## Statistics", "Cliff's delta", f"| A | {SLOW} |", f"| B | {FAST} |", "### Predicted volumes",
                  f"Latency (lower is better): {FAST} (arm B) is better"):
        assert words in markdown, words
    assert not (out / "ab_cases.csv").exists()  # no truth, no scores


def test_patient_in_both_arms_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = _patients(True, 1)[0]  # a patient of the fast arm also served by the slow one
    log = _write_log(tmp_path / "log.csv", _handmade_rows(shared=shared))
    assert main(["ab-report", str(log), "--out", str(tmp_path / "report")]) == 0
    assert "1 patient(s) served by both arms" in capsys.readouterr().err
    summary = json.loads((tmp_path / "report" / "ab_summary.json").read_text())
    assert summary["shared_patients"] == {"count": 1, "ids": [shared]}
    assert not summary["routed"] and summary["arms"] == [FAST, SLOW]  # no clean split: alphabetical
    dom = parse_report((tmp_path / "report" / "ab_report.html").read_text())
    warning = next(p for p in dom.paragraphs if "Contract violation" in p)
    assert "1 patient(s) were served by both arms" in warning and shared in warning
    assert "Contract violation: 1 patient(s)" in (tmp_path / "report" / "ab_report.md").read_text()


@pytest.mark.parametrize(("change", "message"), [
    ("missing", "no such request log"),
    ("columns", "missing column(s) latency_s, doubt"),
    ("no_ok", "no answered request (status ok) among its 10 row(s): 9 busy, 1 bad_image"),
    ("one_arm", "every request names one model (fastnet)"),
    ("three_arms", "3 models (extranet, fastnet, slownet): choose the two arms to compare with --arms A,B"),
    ("not_a_number", "line 2: latency_s 'fast' is not a number"),
])
def test_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, message: str) -> None:
    rows = _handmade_rows()
    log, columns = tmp_path / "log.csv", COLUMNS
    if change == "columns":
        columns = [c for c in COLUMNS if c not in ("latency_s", "doubt")]
    elif change == "no_ok":
        rows = [{**r, "status": "busy" if r["status"] == "ok" else r["status"]} for r in rows if r["model"] == FAST]
    elif change == "one_arm":
        rows = [r for r in rows if r["model"] == FAST]
    elif change == "three_arms":
        rows.append(_row("extranet", "someone", "extra_case"))
    elif change == "not_a_number":
        rows[0]["latency_s"] = "fast"
    if change != "missing":
        _write_log(log, rows, columns)
    assert main(["ab-report", str(log)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medseg ab-report: {log}: ") and message in err and err.count("\n") == 1, err
    if change == "three_arms":  # --arms picks two and counts the others' rows
        assert main(["ab-report", str(log), "--arms", f"{FAST},{SLOW}"]) == 0
        summary = json.loads((tmp_path / "ab_report" / "ab_summary.json").read_text())
        assert summary["arms"] == [FAST, SLOW] and summary["left_out"] == {"extranet": 1}
        assert summary["order"] == "given"  # the order --arms gave, not called alphabetical
        markdown = (tmp_path / "ab_report" / "ab_report.md").read_text()
        assert "as given with --arms" in markdown and "alphabetical" not in markdown


def _dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    both = np.logical_and(prediction, reference).sum()
    return float(2 * both / (prediction.sum() + reference.sum()))


def test_truth_scores_name_the_better_arm(seg3d_root: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec = load_dataset(seg3d_root)
    cases = spec.training + spec.test  # 8 labelled cases: the first four go to arm A, the others to arm B
    rows, expected = [], []
    for i, case in enumerate(cases):
        model = "copynet" if i < 4 else "erodenet"
        label, affine = read_image(case["label"])
        predicted = label if model == "copynet" else ndimage.binary_erosion(label == 1).astype(np.uint8)
        kept = Path("kept") / model / f"{case['id']}.nii.gz"  # relative to the log's folder
        write_nifti(predicted.astype(np.uint8), affine, tmp_path / kept)
        rows.append(_row(model, f"p{i}", case["id"], latency=0.1 + 0.01 * i, prediction=str(kept)))
        expected.append(_dice(predicted == 1, label == 1))
    rows.append(_row("erodenet", "p8", "not_in_truth", prediction="kept/erodenet/not_in_truth.nii.gz"))
    rows.append(_row("erodenet", "p9", cases[5]["id"]))  # prediction not kept
    label, affine = read_image(cases[6]["label"])
    write_nifti(label[1:].astype(np.uint8), affine, tmp_path / "kept" / "cropped.nii.gz")  # another grid
    rows.append(_row("erodenet", "p10", cases[6]["id"], prediction="kept/cropped.nii.gz"))
    log = _write_log(tmp_path / "log.csv", rows)
    assert main(["ab-report", str(log), "--truth", str(seg3d_root / "dataset.json"), "--arms",
                 "copynet,erodenet"]) == 0
    console = capsys.readouterr().out
    assert "Dice of structure1" in console and "scored against" in console
    out = tmp_path / "ab_report"
    summary = json.loads((out / "ab_summary.json").read_text())
    assert summary["truth"]["counts"] == {
        "copynet": {"scored": 4, "no_reference": 0, "no_prediction": 0, "grid_mismatch": 0},
        "erodenet": {"scored": 4, "no_reference": 1, "no_prediction": 1, "grid_mismatch": 1}}
    assert [(m["case"], Path(m["prediction"]).name) for m in summary["truth"]["grid_mismatches"]] == [
        (cases[6]["id"], "cropped.nii.gz")]
    assert "does not match the reference" in summary["truth"]["grid_mismatches"][0]["reason"]
    dice = next(c for c in summary["comparisons"] if c["title"] == "Dice of structure1")
    assert dice["arms"]["copynet"]["mean"] == 1.0 and dice["arms"]["copynet"]["n"] == 4
    assert dice["arms"]["erodenet"]["mean"] == pytest.approx(np.mean(expected[4:]))
    assert dice["better_arm"] == "copynet" and dice["effect"] == 1.0
    assert dice["p"] == pytest.approx(stats.mannwhitneyu([1.0] * 4, expected[4:]).pvalue)
    hd95 = next(c for c in summary["comparisons"] if c["title"] == "HD95 of structure1")
    assert hd95["arms"]["copynet"]["median"] == 0.0 and hd95["arms"]["erodenet"]["median"] > 0
    assert hd95["better_arm"] == "copynet"
    with (out / "ab_cases.csv").open(newline="") as handle:
        scored = {r["case"]: r for r in csv.DictReader(handle)}
    assert len(scored) == 8
    for case, value in zip(cases, expected, strict=True):
        assert float(scored[case["id"]]["dice"]) == pytest.approx(value)
    dom = parse_report((out / "ab_report.html").read_text())
    assert any(p.startswith("Dice of structure1 (higher is better): copynet (arm A) is better") for p in dom.paragraphs)
    assert [row[2:] for row in dom.body(dom.table("truth-counts"))] == [["4", "4", "0", "0", "0"],
                                                                         ["7", "4", "1", "1", "1"]]
    assert any("cropped.nii.gz" in p and "another grid" in p for p in dom.paragraphs)
    assert dom.body(dom.table("table-dice"))[0][-1] == "A" and "HD95 (mm) ↓" in dom.h(3)
    assert "### Dice ↑" in (out / "ab_report.md").read_text()


def test_ids_written_by_serve_are_read_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.serve.requests_log import RequestLog

    # a patient id a spreadsheet would run as a formula, served by both arms: the serve log escapes it, ab-report
    # reads it back as it was sent and still sees it in both arms
    formula = "=cmd|' /C calc'!A0"
    log = RequestLog(tmp_path / "log.csv", COLUMNS)
    for row in [*_handmade_rows(), _row(FAST, formula, "+c1"), _row(SLOW, formula, "-c2", status="busy")]:
        log.append(row)
    assert f"'{formula}" in (tmp_path / "log.csv").read_text()
    assert main(["ab-report", str(tmp_path / "log.csv")]) == 0
    summary = json.loads((tmp_path / "ab_report" / "ab_summary.json").read_text())
    assert summary["shared_patients"] == {"count": 1, "ids": [formula]}
    assert formula in capsys.readouterr().err


def test_rows_without_patient_are_routed_by_request(tmp_path: Path) -> None:
    # medseg serve routes a request without patient or given case id by its request id; the case column still
    # holds the file name's case ("image" for every upload), which routed nothing
    requests = [f"{i:032x}" for i in range(40)]
    rows = [{**_row(FAST if _fraction(r) < 0.5 else SLOW, "", "image"), "request": r} for r in requests]
    assert {r["model"] for r in rows} == {FAST, SLOW}
    summary = _report(tmp_path, rows)
    assert summary["routed"] and summary["order"] == "routed" and summary["arms"] == [SLOW, FAST]


def _report(tmp_path: Path, rows: list[dict]) -> dict[str, Any]:
    log = _write_log(tmp_path / "log.csv", rows)
    assert main(["ab-report", str(log)]) == 0
    return json.loads((tmp_path / "ab_report" / "ab_summary.json").read_text())
