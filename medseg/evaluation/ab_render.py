"""The A/B report's content as the templates ``ab.html.j2``/``ab.md.j2`` show it: warnings, findings, facts,
tables of formatted text (:class:`medseg.evaluation.report_sections.Table`) and the Statistics paragraphs.

Nothing here reads a file: :mod:`medseg.evaluation.ab_report` computes the numbers (``ab_summary.json``), these
functions shape them; the number formats are the benchmark report's (:mod:`medseg.evaluation.report_format`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.evaluation import report_format as fmt
from medseg.evaluation.ab_log import LATENCY
from medseg.evaluation.ab_stats import ALPHA
from medseg.evaluation.report import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from medseg.evaluation.report_sections import Section, Table

if TYPE_CHECKING:
    from medseg.evaluation.ab_report import Comparison

FAMILIES = {"latency": "Latency", "doubt": "Doubt", "volume": "Predicted volumes", "area": "Predicted areas",
            "probability": "Predicted probabilities", "dice": "Dice", "hd95": "HD95"}
TRUTH_FAMILIES = ("dice", "hd95")


def context(summary: dict[str, Any], comparisons: list[Comparison]) -> dict[str, Any]:
    """The variables of the ``ab`` templates."""
    arms = summary["arms"]
    names = " vs ".join(f"{a} ({summary['per_arm'][a]['label']})" for a in arms)
    mine = [c for c in comparisons if c.measure.family not in TRUTH_FAMILIES]
    scored = [c for c in comparisons if c.measure.family in TRUTH_FAMILIES]
    return {
        "title": "medseg A/B report",
        "subtitle": f"{names}: {fmt.integer(summary['requests'])} requests of {Path(summary['log']).name}",
        "toc": [("summary", "Summary"), ("arms", "Arms"), ("comparisons", "Comparisons"),
                ("truth", "Against the reference"), ("statistics", "Statistics")],
        "warnings": warnings(summary), "findings": findings(summary, comparisons), "facts": facts(summary),
        "arms_table": arms_table(summary),
        "sections": family_sections(mine, arms), "truth_sections": family_sections(scored, arms),
        "truth_table": truth_table(summary), "truth_note": truth_note(summary),
        "statistics": summary["statistics"],
    }


def warnings(summary: dict[str, Any]) -> list[str]:
    """What breaks the A/B contract or limits the comparison, most serious first."""
    out = []
    shared = summary["shared_patients"]
    if shared["count"]:
        shown = ", ".join(shared["ids"][:20]) + (", …" if shared["count"] > 20 else "")
        out.append(f"Contract violation: {fmt.integer(shared['count'])} patient(s) were served by both arms "
                   f"({shown}). The split must keep each patient on one arm; these patients' requests are in "
                   "both arms' numbers, so the arms are not independent samples and the tests are optimistic.")
    if summary.get("order", "routed" if summary["routed"] else "alphabetical") == "alphabetical":
        out.append("The arms' order is alphabetical: the requests' routing keys do not separate the two models "
                   "as medseg serve's hash split does, so A and B here need not be the served arms A and B.")
    truth = summary["truth"]
    if truth and truth.get("grid_mismatches"):
        count = len(truth["grid_mismatches"])
        out.append(f"{fmt.integer(count)} kept prediction(s) do not lie on their reference's grid and are not "
                   "scored (listed under Against the reference).")
    for arm, entry in summary["per_arm"].items():
        if not entry["ok"]:
            out.append(f"Arm {entry['label']} ({arm}) answered no request: nothing of it can be compared.")
    if summary["left_out"]:
        told = ", ".join(f"{n} of {m or 'no model'}" for m, n in summary["left_out"].items())
        out.append(f"Rows of other models left out (--arms): {told}.")
    return out


def findings(summary: dict[str, Any], comparisons: list[Comparison]) -> list[str]:
    """One sentence per comparison with a better direction (latency, Dice, HD95): which arm is better."""
    labels = {a: summary["per_arm"][a]["label"] for a in summary["arms"]}
    out = []
    for c in comparisons:
        info, r = c.measure.info, c.result
        if info.better not in ("higher", "lower") or not (r["n_a"] and r["n_b"]):
            continue  # no better direction, or an arm without values (warned about)
        medians = [fmt.number(c.summaries[a]["median"], info.decimals) for a in summary["arms"]]
        unit = f" {info.unit}" if info.unit else ""
        numbers = (f"median {medians[0]}{unit} (A) vs {medians[1]}{unit} (B), difference A − B "
                   f"{_difference(info, r)}; Mann–Whitney U, Holm-adjusted {fmt.p_phrase(r['p_holm'])}, "
                   f"effect size r = {fmt.effect(r['effect'])}")
        best = r["better_arm"]
        if not best:
            out.append(f"{c.measure.title}: neither arm tends to be better ({numbers}).")
            continue
        verdict = "" if r["significant"] else f"; not significant at {ALPHA} after Holm's correction"
        out.append(f"{c.measure.title} ({info.direction}): {best} (arm {labels[best]}) is better, {numbers}{verdict}.")
    return out


def facts(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The facts box: log, arms, period, requests, truth."""
    arms = "; ".join(f"{e['label']}: {a}" for a, e in summary["per_arm"].items())
    order = {"routed": "as medseg serve's hash split routed them", "given": "as given with --arms",
             "alphabetical": "alphabetical: the routing keys do not tell A from B"}[
        summary.get("order", "routed" if summary["routed"] else "alphabetical")]
    truth = summary["truth"]
    period = " to ".join(summary["period"]) if summary["period"] else "n/a"
    return [("Log", summary["log"]), ("Arms", f"{arms} ({order})"), ("Period (UTC)", period),
            ("Requests", f"{fmt.integer(summary['requests'])} of the two arms"),
            ("Patients in both arms", fmt.integer(summary["shared_patients"]["count"])),
            ("Reference labels", truth["source"] if truth else "none (medseg ab-report --truth adds Dice and HD95)")]


def arms_table(summary: dict[str, Any]) -> Table:
    """A row per arm: requests, answered, errors by kind, patients, latency."""
    rows = []
    for arm, e in summary["per_arm"].items():
        errors = ", ".join(f"{k} {fmt.integer(n)}" for k, n in e["errors"].items()) or "none"
        lat = e["latency_s"]
        rows.append([e["label"], arm, fmt.integer(e["requests"]), fmt.integer(e["ok"]), errors,
                     fmt.integer(e["patients"]), fmt.number(lat["median"], 3), fmt.number(lat["p95"], 3),
                     LATENCY.estimate(lat["mean"], None, lat["ci_low"], lat["ci_high"])])
    return Table(["Arm", "Model", "Requests", "Answered (ok)", "Errors by kind", "Patients", "Latency median (s)",
                  "Latency p95 (s)", "Latency mean [95% CI] (s)"], rows,
                 "Every request of each arm; latency over the answered ones (seconds from arrival to response), "
                 "p95 its 95th percentile; patients: distinct patient ids.",
                 numeric=[False, False, True, True, False, True, True, True, True])


def family_sections(comparisons: list[Comparison], arms: list[str]) -> list[Section]:
    """One table per family (latency, each size, Dice, ...), a row per structure."""
    families = list(dict.fromkeys(c.measure.family for c in comparisons))
    return [_family_section(family, [c for c in comparisons if c.measure.family == family], arms)
            for family in families]


def _family_section(family: str, members: list[Comparison], arms: list[str]) -> Section:
    """A row per structure and arm: n, median, mean [CI]; the comparison on arm A's row (arm B's left empty)."""
    info = members[0].measure.info
    unit = f" ({info.unit})" if info.unit else ""
    rows, marked = [], set()
    for c in members:
        r, best = c.result, c.result["better_arm"]
        test = [_difference(info, r, unit=False), fmt.p_value(r["p"]), fmt.p_value(r["p_holm"]),
                fmt.effect(r["effect"]), "AB"[arms.index(best)] if best else "—"]
        for k, arm in enumerate(arms):
            d = c.summaries[arm]
            marked |= {len(rows)} if r["significant"] else set()
            rows.append([(c.measure.structure or info.name) if k == 0 else "", "AB"[k], fmt.integer(d["n"]),
                         fmt.number(d["median"], info.decimals), info.estimate(d["mean"], None, d["ci_low"],
                                                                               d["ci_high"]),
                         *(test if k == 0 else [""] * len(test))])
    direction = f"{info.direction}" if info.better in ("higher", "lower") else "no better direction"
    caption = (f"{info.name}{unit}, {direction}: {info.description}. Arm A: {arms[0]}, arm B: {arms[1]}, their "
               "answered requests; mean [95% bootstrap CI]; the difference of medians A − B [95% bootstrap CI]; the "
               f"two-sided Mann–Whitney U test, Holm-adjusted over the {len(members)} test(s) of this table; effect "
               "size r = Cliff's delta (positive: A's values tend to be higher); the better arm by r. Highlighted: "
               f"Holm-adjusted p < {ALPHA}.")
    table = Table(["Structure" if members[0].measure.structure else "Measure", "Arm", "n", "Median",
                   "Mean [95% CI]", "Median A − B [95% CI]", "p (Mann–Whitney)", "p (Holm)", "Effect size r",
                   "Better arm"], rows, caption, numeric=[False, False] + [True] * 7 + [False], marked=marked)
    title = FAMILIES.get(family, family) + unit + (f" {info.arrow}" if info.better in ("higher", "lower") else "")
    return Section(title, table, family)


def truth_table(summary: dict[str, Any]) -> Table | None:
    """A row per arm: answered requests scored against a reference, and those that could not be."""
    truth = summary["truth"]
    if not truth:
        return None
    rows = [[summary["per_arm"][a]["label"], a, fmt.integer(summary["per_arm"][a]["ok"]),
             *(fmt.integer(c.get(k, 0)) for k in ("scored", "no_reference", "no_prediction", "grid_mismatch"))]
            for a, c in truth["counts"].items()]
    return Table(["Arm", "Model", "Answered", "Scored", "No reference label", "No kept prediction", "Other grid"],
                 rows, "Answered requests scored against the reference labels; the others lack a reference for "
                 "their case, or a kept prediction (medseg serve --keep-predictions) that exists, or their kept "
                 "prediction lies on another grid (shape or affine) than the reference.",
                 numeric=[False, False, True, True, True, True, True])


def truth_note(summary: dict[str, Any]) -> str:
    """What the reference section compares, or how to get it."""
    truth = summary["truth"]
    if not truth:
        return ("No reference labels were given: medseg ab-report --truth DATASET (a dataset.json or a folder of "
                "<case>.nii.gz label maps) scores the kept predictions by Dice and HD95.")
    missing = (f" Prediction files the log names but that do not exist, e.g. {', '.join(truth['missing_files'])}."
               if truth["missing_files"] else "")
    mismatches = truth.get("grid_mismatches") or []
    if mismatches:
        shown = "; ".join(f"{m['prediction']} (request {m['request']}, case {m['case']})" for m in mismatches[:20])
        missing += (f" Not scored, on another grid than their reference: {shown}"
                    f"{f' and {len(mismatches) - 20} more' if len(mismatches) > 20 else ''}.")
    return (f"Each kept prediction against the reference label of its case ({truth['source']}), per structure "
            f"({', '.join(truth['structures']) or 'none'}), with medseg evaluate's metrics and empty-mask rules "
            f"(a missed structure: Dice 0, HD95 the image diagonal). {fmt.integer(truth['scored'])} request(s) "
            f"scored.{missing}")


def statistics_paragraphs(summary: dict[str, Any]) -> list[str]:
    """The Statistics section: the samples, the summaries, the test, the correction, the effect size, the units."""
    arms, per_arm = summary["arms"], summary["per_arm"]
    n = "; ".join(f"n = {fmt.integer(per_arm[a]['ok'])} answered requests in arm {per_arm[a]['label']} ({a})"
                  for a in arms)
    families = sorted({c["family"] for c in summary["comparisons"]}, key=list(FAMILIES).index)
    units = {FAMILIES[c["family"]]: c["unit"] or ("unitless, in [0, 1]" if c["family"] in ("dice", "probability")
                                                  else "unitless") for c in summary["comparisons"]}
    return [
        f"Data: {n}. The arms saw different patients (medseg serve splits the requests by a hash of the patient "
        "id), so every comparison is unpaired. Each answered request counts once: repeated requests of one "
        "patient are not independent, and patients served by both arms break the design (both are reported "
        "above). With reference labels, the n of Dice and HD95 are the scored requests of each arm.",
        "Summaries: the median, the 95th percentile (linear interpolation) and the mean of each arm; the 95% "
        f"confidence interval of a mean is a percentile bootstrap over the requests ({BOOTSTRAP_RESAMPLES:,} "
        f"resamples with replacement, seed {BOOTSTRAP_SEED}), and that of the difference of medians A − B "
        "resamples each arm on its own.",
        "Tests: the two-sided Mann–Whitney U test of arm A's values against arm B's (scipy.stats.mannwhitneyu: "
        "exact when an arm has at most 8 values and there are no ties, else the normal approximation with tie "
        "and continuity corrections; p = 1 when every value is the same). The p-values are Holm–Bonferroni-"
        f"adjusted (step-down) within each family of tests: {', '.join(FAMILIES[f] for f in families)} — one "
        "test per structure for the per-structure families; families are not corrected for one another. p "
        f"(Holm) < {ALPHA} is called significant.",
        "Effect size: the rank-biserial correlation r = 2 U_A/(n_A n_B) − 1 of the Mann–Whitney statistic U_A of "
        "arm A, which equals Cliff's delta P(A > B) − P(A < B) over all pairs of one request of each arm, in "
        "[−1, 1]: +1 when every value of A is above every value of B. The better arm is the one r favours (for a "
        "lower-is-better measure such as latency or HD95, a negative r favours A); measures without a better "
        "direction (sizes, doubt) name none.",
        "Units: " + "; ".join(f"{name}: {units[name]}" for name in sorted(units, key=list(FAMILIES.values()).index))
        + "; effect sizes and p-values: unitless.",
    ]


def _difference(info: fmt.MetricInfo, r: dict[str, Any], unit: bool = True) -> str:
    """``+0.12 s [+0.05, +0.20]``: the difference of medians A − B and its interval."""
    text = info.signed(r["median_diff"]) + (f" {info.unit}" if unit and info.unit else "")
    if fmt.number(r["diff_low"], 1) != "n/a" and fmt.number(r["diff_high"], 1) != "n/a":
        text += f" [{info.signed(r['diff_low'])}, {info.signed(r['diff_high'])}]"
    return text
