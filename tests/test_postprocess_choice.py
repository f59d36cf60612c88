"""Post-processing chosen on cross-validation results: only steps that help are kept."""

from __future__ import annotations

import numpy as np

from medseg.evaluation.postprocess_choice import Case, choose_postprocessing


def _ball(shape: tuple[int, ...], centre: tuple[int, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def _cases(islands: bool) -> list[Case]:
    out = []
    for shift in range(4):
        ref = np.zeros((32, 32, 16), np.uint8)
        ref[_ball(ref.shape, (14 + shift, 15, 8), 6)] = 1
        pred = ref.copy()
        pred[_ball(ref.shape, (14 + shift, 15, 8), 5.5) ^ _ball(ref.shape, (14 + shift, 15, 8), 6)] = 0  # a rim off
        if islands:
            pred[2:4, 2:4, 2:4] = 1  # spurious islands far away
            pred[28:30, 27:29, 12:14] = 1
        out.append(Case(pred, ref, (1.0, 1.0, 2.0)))
    return out


def test_spurious_islands_make_it_choose_a_component_filter() -> None:
    steps, scores = choose_postprocessing(_cases(islands=True), classes=[1])
    assert len(steps) == 1 and steps[0]["classes"] == [1]
    assert steps[0]["op"] in ("keep_largest_component", "remove_small_components")
    assert scores["after_dice"][0] > scores["before_dice"][0]
    assert scores["after_hd95"][0] < scores["before_hd95"][0]


def test_clean_predictions_get_nothing() -> None:
    steps, scores = choose_postprocessing(_cases(islands=False), classes=[1])
    assert steps == []
    assert scores["after_dice"] == scores["before_dice"]


def test_two_real_blobs_keep_both_and_only_the_island_goes() -> None:
    # Class 2 is legitimately two blobs (~268 mm^3 each) and the prediction adds an 8 mm^3 island: keeping the
    # largest component would delete a real blob, so the choice must be a small-component filter instead.
    cases = []
    for _ in range(2):
        ref = np.zeros((32, 32, 16), np.uint8)
        ref[_ball(ref.shape, (8, 8, 8), 4)] = 2
        ref[_ball(ref.shape, (24, 24, 8), 4)] = 2
        pred = ref.copy()
        pred[14:16, 28:30, 2:4] = 2
        cases.append(Case(pred, ref, (1.0, 1.0, 1.0)))
    steps, scores = choose_postprocessing(cases, classes=[2])
    assert [s["op"] for s in steps] == ["remove_small_components"]
    assert 8 < steps[0]["min_volume_mm3"] < 268
    assert scores["after_dice"] == [1.0]
