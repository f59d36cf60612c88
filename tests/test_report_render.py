"""The benchmark report as a reader sees it: rendered from the templates with handcrafted numbers, parsed back
(stdlib ``html.parser``) and, where a Chromium is installed, laid out by a real browser (DOM and screenshot)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg.data.datalist import DatasetSpec
from medseg.evaluation import plots, ranking, report
from medseg.evaluation import report_format as fmt
from medseg.evaluation.benchmark_report import (
    Settings,
    benchmark_context,
    conventions_section,
    structure_names,
)
from medseg.evaluation.report_sections import Figure, class_sections
from medseg.visualize import overlay, save_montage

MODELS = ["unet", "attention_unet", "segresnet"]
SECTIONS = ["Summary", "Results by metric", "Per-class results", "Fold ensemble on the test cases",
            "Model size and run time", "Statistics", "Metric conventions", "Figures"]
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


class ReportDom(HTMLParser):
    """Headings, tables (caption, header, rows of cell text), figures (image source, caption) and links of a
    page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.headings: list[tuple[int, str, str]] = []
        self.tables: list[dict[str, Any]] = []
        self.figures: list[dict[str, str]] = []
        self.links: list[tuple[str, str]] = []
        self.paragraphs: list[str] = []
        self._text: list[str] | None = None
        self._attrs: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag in ("h1", "h2", "h3", "th", "td", "caption", "figcaption", "a", "p"):
            self._text, self._attrs = [], attributes
        if tag == "table":
            self.tables.append({"id": attributes.get("id", ""), "caption": "", "head": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag == "figure":
            self.figures.append({"src": "", "alt": "", "caption": ""})
        elif tag == "img" and self.figures:
            self.figures[-1].update(src=attributes.get("src", ""), alt=attributes.get("alt", ""))

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        text = " ".join("".join(self._text or []).split())
        if tag in ("h1", "h2", "h3"):
            self.headings.append((int(tag[1]), text, self._attrs.get("id", "")))
        elif tag == "th" and self.tables:
            self.tables[-1]["head"].append(text)
        elif tag == "td" and self.tables:
            self.tables[-1]["rows"][-1].append(text)
        elif tag == "caption" and self.tables:
            self.tables[-1]["caption"] = text
        elif tag == "figcaption" and self.figures:
            self.figures[-1]["caption"] = text
        elif tag == "a":
            self.links.append((self._attrs.get("href", ""), text))
            return  # the text of a link also belongs to its cell or paragraph
        elif tag == "p":
            self.paragraphs.append(text)
        if tag in ("h1", "h2", "h3", "th", "td", "caption", "figcaption", "p"):
            self._text = None

    def h(self, level: int) -> list[str]:
        return [text for lvl, text, _ in self.headings if lvl == level]

    def table(self, table_id: str) -> dict[str, Any]:
        return next(t for t in self.tables if t["id"] == table_id)

    @staticmethod
    def body(table: dict[str, Any]) -> list[list[str]]:
        return [row for row in table["rows"] if row]  # the header row holds th cells only


def parse_report(page: str) -> ReportDom:
    """The structure of a report page (see :class:`ReportDom`)."""
    dom = ReportDom()
    dom.feed(page)
    return dom


def _metrics_csv(folder: Path, epochs: int, seed: int) -> str:
    """A Lightning ``metrics.csv`` with a training loss every epoch and validation every second epoch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = ["epoch,step,train/loss_epoch,val/dice,val/loss"]
    for epoch in range(epochs):
        lines.append(f"{epoch},{epoch * 3},{2 - 0.2 * epoch + rng.uniform(0, .05)},,")
        if epoch % 2:
            lines.append(f"{epoch},{epoch * 3},,{0.3 + 0.1 * epoch},{1.9 - 0.15 * epoch}")
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return str(folder)


def _handcrafted_report(out: Path) -> None:
    """A benchmark report of three models on 20 cases, rendered from made-up numbers and real figures."""
    rng = np.random.default_rng(0)
    cases = [f"case_{i:03d}" for i in range(20)]
    tables = {m: {c: {"dice": float(np.clip(0.7 + 0.05 * k + rng.normal(0, 0.05), 0, 1)),
                      "nsd": float(rng.uniform(0.5, 0.9)), "hd95": float(rng.uniform(2, 30) + 1500 * (c == "case_000")),
                      "assd": float(rng.uniform(0.5, 5)), "ece": float(rng.uniform(0, 0.1)),
                      "brier": float(rng.uniform(0, 0.05)), "nll": float(rng.uniform(0.1, 0.4))} for c in cases}
              for k, m in enumerate(MODELS)}
    rows = report.compare(tables, report.SEG_METRICS)
    rows += [{"model": "unet (fold ensemble, 2 test cases)", "metric": m, "mean": 0.5} for m in report.SEG_METRICS]
    runs = {m: {"parameters": 1_234_567 * (k + 1), "train_seconds": 3723.4, "predict_seconds_per_case": 0.25}
            for k, m in enumerate(MODELS)}
    spec = DatasetSpec(Path("/data/liver/dataset.json"), "segmentation", {0: "background", 1: "liver", 2: "tumour"},
                       ["CT"])
    stats = {"mean": 0.8, "std": 0.05, "median": 0.8, "n": 20, "undefined": 0}
    per_class = {m: {key: {"dice": stats, "hd95": {**stats, "mean": 4.2}, "area_diff_mm2": {**stats, "mean": -12.5}}
                     for key in ("1", "2")} for m in MODELS}
    sections = class_sections(per_class, structure_names(spec, ["1", "2"]), ["dice", "hd95", "area_diff_mm2"])
    conventions = conventions_section({"both_empty": 1.0, "distance_penalty": "diagonal"},
                                      {m: {"prediction_empty": k, "reference_empty": 0, "both_empty": 2}
                                       for k, m in enumerate(MODELS)})
    logs = {m: [_metrics_csv(out / "logs" / m / str(f), 4, f) for f in range(2)] for m in MODELS}
    curve = {"confidence": [0.1, 0.5, 0.9], "frequency": [0.15, 0.45, 0.85], "count": [1000, 200, 3000]}
    image, reference = rng.normal(size=(40, 40)), np.zeros((40, 40), np.uint8)
    reference[10:25, 12:30] = 1
    figures = [
        Figure(plots.box_plots(tables, report.SEG_METRICS, out / "boxplots.png"), "Per-case values", "Boxes."),
        Figure(plots.training_curves(logs, out / "training_curves.png"), "Training curves", "Loss per epoch."),
        Figure(plots.reliability_lines({"unet, liver (label 1)": curve}, out / "reliability.png", "Reliability"),
               "Calibration", "Reliability diagram."),
        Figure(save_montage([overlay(image, reference, np.roll(reference, 3, 0))] * 2, ["best", "worst"],
                            out / "montage.png", heading="Model unet"), "Best and worst cases of unet",
               "Green: reference; red: prediction."),
    ]
    context = benchmark_context("segmentation", str(spec.source), runs, tables, rows,
                                Settings("kfold", 5, 0, ["--trainer.max_epochs", "4"]), figures, sections,
                                "Per structure.", conventions)
    report.write_reports(out, "benchmark", context)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    _handcrafted_report(out)
    return out


def check_benchmark_page(dom: ReportDom, models: list[str], classes: list[str], figures: int) -> None:
    """What every benchmark report must show (shared with the end-to-end test in ``test_benchmark.py``)."""
    assert dom.h(1) == ["medseg benchmark"]
    assert {"Summary", "Results by metric", "Per-class results", "Model size and run time", "Statistics",
            "Figures"} <= set(dom.h(2))
    assert dom.h(2).index("Summary") == 0  # the summary comes first
    for metric in report.SEG_METRICS:  # one table per metric, a row per model, human column names
        table = dom.table(f"table-{metric}")
        assert table["head"] == ["Model", "Cases (n)", table["head"][2], table["head"][3], "p (Wilcoxon)",
                                 "p (Holm)", "Effect size r"]
        assert table["head"][2].startswith("Mean ± std [95% CI]")
        body = dom.body(table)
        assert sorted(r[0].removesuffix(" (best)") for r in body) == sorted(models)
        assert sum(r[0].endswith(" (best)") for r in body) == 1
        decimals = 2 if metric in ("hd95", "assd") else 3
        number = rf"−?[\d,]+\.\d{{{decimals}}}"
        for row in body:
            assert re.fullmatch(rf"{number} ± {number} \[{number}, {number}\]", row[2]), row
            assert all(re.fullmatch(r"<0\.001|[01]\.\d{3}|—", p) for p in row[4:6]), row
            assert re.fullmatch(r"[+−]?\d\.\d{2}|—", row[6]), row
    units = {text for text in dom.h(3)}
    assert {"HD95 (mm) ↓", "ASSD (mm) ↓", "Dice ↑"} <= units
    for name in classes:  # per-class tables named by the dataset's labels
        assert any(name in text for text in dom.h(3)), name
        table = next(t for t in dom.tables if t["caption"].startswith(name))
        assert sorted(r[0] for r in dom.body(table)) == sorted(models) and "Dice ↑" in table["head"]
    resources = dom.table("resources")
    assert resources["head"][:2] == ["Model", "Parameters"] and len(dom.body(resources)) == len(models)
    statistics = " ".join(dom.paragraphs)
    for words in ("n = ", "2,000 resamples", "Wilcoxon signed-rank", "Holm–Bonferroni", "rank-biserial", "mm"):
        assert words in statistics, words
    assert len(dom.figures) == figures
    for i, figure in enumerate(dom.figures, start=1):
        assert figure["src"].startswith("data:image/png;base64,") and len(figure["src"]) > 1000
        assert re.match(rf"Figure {i}\. \S.+\. \S", figure["caption"]), figure["caption"]


def test_report_structure_from_the_html_text(rendered: Path) -> None:
    page = (rendered / "report.html").read_text()
    dom = parse_report(page)
    check_benchmark_page(dom, MODELS, ["liver (label 1)", "tumour (label 2)"], figures=4)
    assert dom.h(2) == SECTIONS
    lead = next(p for p in dom.paragraphs if "has the best Dice" in p)
    assert "segresnet" in lead and "Holm-adjusted p" in lead and "[95% CI]" in lead
    hd95 = dom.body(dom.table("table-hd95"))
    assert any(re.search(r"± 3\d\d\.\d\d", row[2]) for row in hd95)  # the 1500 mm outlier: mm with 2 decimals
    resources = dom.body(dom.table("resources"))
    assert resources[0][1:] == ["1,234,567", "1 h 02 min", "250.0 ms"]
    conventions = dom.table("conventions-table")
    assert conventions["head"][0] == "reference / prediction"
    assert any(r[0] == "HD95, ASSD" and "image diagonal" in r[2] for r in dom.body(conventions))
    assert [r[:2] for r in dom.body(dom.table("convention-counts"))] == [["unet", "0"], ["attention_unet", "1"],
                                                                         ["segresnet", "2"]]
    area = next(t for t in dom.tables if t["caption"].startswith("liver"))
    assert "Area difference (mm²) →0" in area["head"] and dom.body(area)[0][-1] == "−12.50 ± 0.05"
    for raw in ("wilcoxon_p", "ci_low", "effect_rbc", "predict_seconds_per_case", "train_seconds"):
        assert raw not in page  # no raw identifiers
    md = (rendered / "report.md").read_text()
    for text in ("# medseg benchmark", "## Statistics", "### HD95 (mm) ↓", "| Model | Cases (n) |",
                 "![Figure 1: Per-case values](boxplots.png)", "**Figure 4. Best and worst cases of unet.**",
                 "### liver (label 1)", "| reference / prediction |"):
        assert text in md, text


def test_number_formats() -> None:
    assert fmt.info("hd95").estimate(1234.567, 12.3, 1200, 1300.1) == "1,234.57 ± 12.30 [1,200.00, 1,300.10]"
    assert fmt.info("dice").estimate(0.34361, float("nan"), "", "") == "0.344"
    assert fmt.info("dice").signed(-0.0004) == "0.000" and fmt.info("dice").signed(0.06) == "+0.060"
    assert [fmt.p_value(p) for p in (3.052e-05, 0.0123, 1.0, "", float("nan"))] == ["<0.001", "0.012", "1.000",
                                                                                   "n/a", "n/a"]
    assert fmt.p_phrase(0.0001) == "p < 0.001" and fmt.p_phrase(0.2) == "p = 0.200"
    assert fmt.effect(-1) == "−1.00" and fmt.effect(0.5385) == "+0.54" and fmt.effect(0) == "0.00"
    assert fmt.integer(7741) == "7,741" and fmt.integer("2595") == "2,595"
    assert [fmt.seconds(s) for s in (8.29, 245, 7384)] == ["8.3 s", "4 min 05 s", "2 h 03 min"]
    assert fmt.milliseconds(0.1232) == "123.2 ms"
    assert [fmt.info(m).arrow for m in ("dice", "hd95", "area_diff_mm2")] == ["↑", "↓", "→0"]
    assert fmt.info("assd").label == "ASSD (mm)" and fmt.info("volume_diff_ml").label == "Volume difference (ml)"


def test_structure_names_from_labels_and_regions() -> None:
    spec = DatasetSpec(Path("d/dataset.json"), "segmentation", {0: "background", 1: "edema", 2: "core"}, ["MR"],
                       regions=[("whole", (1, 2)), ("inner", (2,))])
    names = structure_names(spec, ["whole", "inner", "1", "3"], given={"3": "extra", "1": "1"})
    assert names == {"whole": "whole (labels 1, 2)", "inner": "inner (label 2)", "1": "edema (label 1)",
                     "3": "extra (label 3)"}  # the dataset's names first; a summary's name where it has none


def test_datasets_report_structure(tmp_path: Path) -> None:
    def rows(means: dict[str, float]) -> list[dict[str, Any]]:
        return [{"model": m, "metric": metric, "mean": v, "ci_low": v - 0.01, "ci_high": v + 0.01}
                for m, v in means.items() for metric in report.SEG_METRICS]

    results = {"alpha": rows({"x": 0.9, "y": 0.8}), "beta": rows({"x": 0.6, "y": 0.7})}
    context = ranking.datasets_context(results, ["x", "y"], report.SEG_METRICS, "dice",
                                       {"alpha": "/d/alpha", "beta": "/d/beta"}, [("Models", "x, y")])
    report.write_reports(tmp_path, "datasets", context)
    dom = parse_report((tmp_path / "report.html").read_text())
    assert dom.h(1) == ["medseg benchmark across datasets"]
    assert dom.h(2) == ["Summary", "Dice ↑ per dataset", "Mean rank per metric", "Statistics", "Datasets"]
    values = dom.table("by-dataset")
    assert values["head"] == ["Model", "alpha", "beta", "Mean rank"]
    assert dom.body(values) == [["x", "0.900 [0.890, 0.910]", "0.600 [0.590, 0.610]", "1.50"],
                                ["y", "0.800 [0.790, 0.810]", "0.700 [0.690, 0.710]", "1.50"]]
    assert dom.table("mean-ranks")["head"][:3] == ["Model", "Dice ↑", "NSD ↑"]
    assert ("beta/report.html", "beta") in dom.links
    md = (tmp_path / "report.md").read_text()
    assert "| Model | alpha | beta | Mean rank |" in md and "[alpha](alpha/report.html)" in md


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args], capture_output=True,
                          text=True, timeout=180, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium/chromium-browser/google-chrome binary on PATH")
def test_report_in_headless_chromium(rendered: Path, tmp_path: Path) -> None:
    url = (rendered / "report.html").resolve().as_uri()
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    dom = parse_report(_chromium(profile, "--dump-dom", url).stdout)
    check_benchmark_page(dom, MODELS, ["liver (label 1)", "tumour (label 2)"], figures=4)
    assert dom.h(2) == SECTIONS
    screenshot = tmp_path / "report.png"
    _chromium(profile, "--window-size=1300,2600", "--hide-scrollbars", f"--screenshot={screenshot}", url)
    from PIL import Image

    with Image.open(screenshot) as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.shape == (2600, 1300) and pixels.std() > 10  # laid out, not a blank page
    print(f"report screenshot: {screenshot}")
    if os.environ.get("MEDSEG_KEEP_ARTIFACTS"):
        kept = Path(__file__).parent / "artifacts" / "report.png"
        kept.parent.mkdir(exist_ok=True)
        shutil.copy(screenshot, kept)
