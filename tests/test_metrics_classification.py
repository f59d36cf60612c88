"""Classification metrics: agreement with scikit-learn, hand-computed answers and edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import sklearn.metrics as skm  # the reference (a test dependency: pip install -e ".[test]")
import torch
from torchmetrics.classification import BinaryCalibrationError, MulticlassAUROC, MulticlassCalibrationError

from medseg.metrics.auroc_metric import ExactAUROC
from medseg.metrics.classification import (
    accuracy,
    balanced_accuracy,
    binary_roc_auc,
    brier_score,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    negative_log_likelihood,
    precision_recall_f1,
    reliability_curve,
    roc_auc,
)
from medseg.tasks.classification import ClassificationModule

TOL = 1e-6


def _random_case(seed: int, k: int, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(n,)`` with every class present and tie-heavy probabilities ``(n, k)``.

    Probabilities are small integer weights normalised per row, so many rows (and scores) are exactly equal.
    """
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    rng.shuffle(y)
    weights = rng.integers(1, 4, size=(n, k)).astype(np.float64)
    weights[np.arange(n), y] += rng.integers(0, 3, size=n)  # some signal, still many ties
    return y, weights / weights.sum(axis=1, keepdims=True)


CASES = [(seed, k) for seed in (0, 1, 2) for k in (2, 4)]


@pytest.mark.parametrize(("seed", "k"), CASES)
def test_label_metrics_match_sklearn(seed: int, k: int) -> None:
    y, p = _random_case(seed, k)
    y_pred = p.argmax(axis=1)
    labels = list(range(k))
    np.testing.assert_array_equal(
        confusion_matrix(y, y_pred, k), skm.confusion_matrix(y, y_pred, labels=labels)
    )
    assert accuracy(y, y_pred) == pytest.approx(skm.accuracy_score(y, y_pred), abs=TOL)
    assert balanced_accuracy(y, y_pred, k) == pytest.approx(skm.balanced_accuracy_score(y, y_pred), abs=TOL)
    prf = precision_recall_f1(y, y_pred, k)
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        ref = fn(y, y_pred, labels=labels, average=None, zero_division=0)
        np.testing.assert_allclose(prf[name], ref, atol=TOL)
        ref_macro = fn(y, y_pred, labels=labels, average="macro", zero_division=0)
        assert prf[name].mean() == pytest.approx(ref_macro, abs=TOL)


@pytest.mark.parametrize(("seed", "k"), CASES)
def test_probability_metrics_match_sklearn(seed: int, k: int) -> None:
    y, p = _random_case(seed, k)
    auc, per_class = roc_auc(y, p)
    if k == 2:
        assert auc == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=TOL)
        assert brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p[:, 1]), abs=TOL)
    else:
        assert auc == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=TOL)
        for c in range(k):
            assert per_class[c] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]), abs=TOL)
        ref = np.mean(np.sum((p - np.eye(k)[y]) ** 2, axis=1))
        assert brier_score(y, p) == pytest.approx(ref, abs=TOL)
    assert negative_log_likelihood(y, p) == pytest.approx(skm.log_loss(y, p, labels=list(range(k))), abs=TOL)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binary_auc_with_heavy_ties_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    y[:2] = [0, 1]
    scores = np.round(rng.random(300) * 0.6 + 0.3 * y, 1)  # ~10 distinct values
    assert binary_roc_auc(y == 1, scores) == pytest.approx(skm.roc_auc_score(y, scores), abs=TOL)


def test_auc_extremes_and_single_class() -> None:
    y = np.array([0, 0, 1, 1])
    assert binary_roc_auc(y == 1, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert binary_roc_auc(y == 1, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert binary_roc_auc(y == 1, np.full(4, 0.5)) == 0.5  # all tied: half credit
    assert np.isnan(binary_roc_auc(np.zeros(4, bool), np.array([0.1, 0.2, 0.3, 0.4])))


def test_ece_known_answer() -> None:
    # bins=5 -> edges 0, .2, .4, .6, .8, 1; bins are [lo, hi) (torchmetrics' rule).
    p = np.array([[0.1, 0.9], [0.3, 0.7], [0.35, 0.65], [0.55, 0.45]])
    y = np.array([1, 0, 1, 0])
    # confidences .9 (correct), .7 (wrong), .65 (correct), .55 (correct)
    # bin [.4,.6): n=1, acc 1,  conf .55   -> |1 - .55|  * 1 = .45
    # bin [.6,.8): n=2, acc .5, conf .675  -> |.5 - .675| * 2 = .35
    # bin [.8, 1): n=1, acc 1,  conf .9    -> |1 - .9|   * 1 = .10
    # ECE = (.45 + .35 + .10) / 4 = .225
    assert expected_calibration_error(y, p, bins=5) == pytest.approx(0.225, abs=1e-12)
    curve = reliability_curve(y, p, bins=5)
    np.testing.assert_array_equal(curve["count"], [0, 0, 1, 2, 1])
    np.testing.assert_allclose(curve["confidence"][2:], [0.55, 0.675, 0.9])
    np.testing.assert_allclose(curve["accuracy"][2:], [1.0, 0.5, 1.0])
    assert np.isnan(curve["confidence"][:2]).all() and np.isnan(curve["accuracy"][:2]).all()
    assert curve["edges"].shape == (6,)
    # Default 15 bins put every sample alone: (.45 + .35 + .70 + .10) / 4 = .4
    assert expected_calibration_error(y, p) == pytest.approx(0.4, abs=1e-12)


def test_reliability_bins_are_left_closed_like_torchmetrics() -> None:
    p = np.array([[0.5, 0.5], [0.0, 1.0], [0.4, 0.6]])
    curve = reliability_curve(np.array([0, 1, 1]), p, bins=5)
    # .5 -> [.4, .6); .6 -> [.6, .8); 1.0 (a slot of its own for the ECE) is drawn in [.8, 1]
    np.testing.assert_array_equal(curve["count"], [0, 0, 1, 1, 1])
    curve2 = reliability_curve(np.array([0]), np.array([[0.5, 0.5]]), bins=2)
    np.testing.assert_array_equal(curve2["count"], [0, 1])  # .5 -> [.5, 1]


def test_ece_on_edges_matches_torchmetrics_where_the_old_right_closed_bins_did_not() -> None:
    # .6 sits on an edge of 5 bins. torchmetrics: [.6, .8) holds .6 (right) and .7 (wrong): |.5 - .65| * 2 / 2.
    # The former (lo, hi] bins put .6 with [.4, .6] and gave (|1 - .6| + |0 - .7|) / 2 = .55.
    p, y = np.array([[0.4, 0.6], [0.3, 0.7]]), np.array([1, 0])
    ref = MulticlassCalibrationError(num_classes=2, n_bins=5, norm="l1")(torch.from_numpy(p), torch.from_numpy(y))
    assert ref.item() == pytest.approx(0.15, abs=1e-6)
    assert expected_calibration_error(y, p, bins=5) == pytest.approx(ref.item(), abs=1e-6)
    # Confidence exactly 1 is a slot of its own: 1.0 (wrong) and .95 (right) are not pooled (that gave .475).
    p, y = np.array([[0.0, 1.0], [0.05, 0.95]]), np.array([0, 1])
    ref = MulticlassCalibrationError(num_classes=2, n_bins=15, norm="l1")(torch.from_numpy(p), torch.from_numpy(y))
    assert ref.item() == pytest.approx((1.0 + 0.05) / 2, abs=1e-6)
    assert expected_calibration_error(y, p) == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_ece_matches_torchmetrics_multiclass(k: int) -> None:
    rng = np.random.default_rng(k)
    p = rng.dirichlet(np.full(k, 0.7), size=3000)
    top = np.repeat(np.r_[np.arange(16) / 15, np.arange(16) / 15 - 1e-10], 5)  # on and just below edges
    top = np.clip(top, 1.0 / k + 1e-3, 1.0)
    edge_rows = np.c_[top, np.repeat((1 - top)[:, None] / (k - 1), k - 1, axis=1)]
    p = np.r_[p, edge_rows, np.full((5, k), 1.0 / k)]  # ... and ties (top label: class 0)
    y = rng.integers(0, k, p.shape[0])
    ref = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")(torch.from_numpy(p), torch.from_numpy(y))
    assert expected_calibration_error(y, p) == pytest.approx(ref.item(), abs=1e-6)
    if k == 2:  # top-label ECE: not torchmetrics' BinaryCalibrationError, which bins p_1 against y
        binary = BinaryCalibrationError(n_bins=15, norm="l1")(torch.from_numpy(p[:, 1]), torch.from_numpy(y))
        assert abs(expected_calibration_error(y, p) - binary.item()) > 1e-3


def test_multiclass_brier_known_answer() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    y = np.array([0, 2])
    # row 1: (.7-1)^2 + .2^2 + .1^2 = .09 + .04 + .01 = .14
    # row 2: .2^2 + .5^2 + (.3-1)^2 = .04 + .25 + .49 = .78   -> mean .46
    assert brier_score(y, p) == pytest.approx(0.46, abs=1e-12)
    assert brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p, labels=[0, 1, 2]), abs=TOL)
    # Binary: mean (p1 - y)^2 = ((.8-1)^2 + .4^2) / 2 = (.04 + .16) / 2 = .1
    assert brier_score(np.array([1, 0]), np.array([[0.2, 0.8], [0.6, 0.4]])) == pytest.approx(0.1, abs=1e-12)


def test_class_never_predicted_has_zero_precision_without_warnings() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3]] * 2)  # class 2 never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, p)
    assert m["precision_class2"] == 0.0 and m["recall_class2"] == 0.0 and m["f1_class2"] == 0.0
    ref = skm.f1_score(y, p.argmax(1), labels=[0, 1, 2], average="macro", zero_division=0)
    assert m["f1_macro"] == pytest.approx(ref, abs=TOL)


def test_class_absent_from_truth_gives_nan_auc_and_macro_over_rest() -> None:
    y, p = _random_case(5, 4)
    y = np.where(y == 3, 0, y)  # class 3 never true
    macro, per_class = roc_auc(y, p)
    assert np.isnan(per_class[3])
    refs = [skm.roc_auc_score(y == c, p[:, c]) for c in range(3)]
    np.testing.assert_allclose(per_class[:3], refs, atol=TOL)
    assert macro == pytest.approx(np.mean(refs), abs=TOL)
    m = classification_metrics(y, p, label_names=["a", "b", "c", "d"])
    assert np.isnan(m["auc_d"]) and m["auc"] == pytest.approx(macro)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about predicted classes missing from y_true
        ref_bacc = skm.balanced_accuracy_score(y, p.argmax(1))
    assert m["balanced_accuracy"] == pytest.approx(ref_bacc, abs=TOL)


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 3, 1, 2])
    m = classification_metrics(y, np.eye(4)[y])
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["f1_macro"] == 1.0
    assert m["auc"] == 1.0 and m["brier"] == 0.0
    assert m["ece"] < 1e-12 and m["nll"] < 1e-12


def test_classification_metrics_keys_and_binary_auc() -> None:
    y, p = _random_case(7, 2)
    m = classification_metrics(y, p, label_names=["benign", "malignant"])
    expected = {"accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auc", "nll"}
    assert expected | {"brier", "ece"} <= m.keys()
    for name in ("benign", "malignant"):
        assert {f"precision_{name}", f"recall_{name}", f"f1_{name}", f"auc_{name}"} <= m.keys()
    assert m["auc_benign"] == m["auc_malignant"] == m["auc"]
    assert all(isinstance(v, float) for v in m.values())


def test_bad_inputs_are_refused() -> None:
    y = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics(y, np.array([[0.5, 0.6], [0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        classification_metrics(np.array([0, 1, 2]), np.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="3 labels but 2"):
        classification_metrics(y, np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="label names"):
        classification_metrics(y, np.full((3, 2), 0.5), label_names=["a"])
    with pytest.raises(ValueError, match="integer"):
        accuracy(np.array([0.5, 1.0]), np.array([0, 1]))


def _fed_in_batches(metric: ExactAUROC, p: np.ndarray, y: np.ndarray, size: int = 7) -> float:
    for start in range(0, len(y), size):
        metric.update(torch.from_numpy(p[start:start + size]), torch.from_numpy(y[start:start + size]))
    return metric.compute().item()


@pytest.mark.parametrize(("seed", "k"), [(0, 2), (1, 2), (2, 3), (3, 3)])
def test_exact_auroc_metric_is_roc_auc_and_sklearn(seed: int, k: int) -> None:
    y, p = _random_case(seed, k, n=53)  # tie-heavy; 8 batches, the last one short
    p = p.astype(np.float32)
    value = _fed_in_batches(ExactAUROC(k), p, y)
    assert value == pytest.approx(roc_auc(y, p)[0], abs=1e-6)
    ref = skm.roc_auc_score(y, p[:, 1]) if k == 2 else skm.roc_auc_score(y, p, multi_class="ovr")
    assert value == pytest.approx(ref, abs=1e-6)


def test_exact_auroc_leaves_a_class_absent_from_the_epoch_out() -> None:
    p = np.array([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.2, 0.7, 0.1], [0.3, 0.4, 0.3], [0.4, 0.4, 0.2],
                  [0.1, 0.5, 0.4]], dtype=np.float32)
    y = np.array([0, 0, 1, 1, 0, 1])  # class 2 never true
    # class 0: every positive above every negative -> 1; class 1: 8.5 of 9 pairs (one tie at .4) -> .9444
    value = _fed_in_batches(ExactAUROC(3), p, y, size=4)
    assert value == pytest.approx((1.0 + 8.5 / 9) / 2, abs=1e-6)
    assert value == pytest.approx(roc_auc(y, p)[0], abs=1e-6)
    refs = [skm.roc_auc_score(y == c, p[:, c]) for c in (0, 1)]
    assert value == pytest.approx(np.mean(refs), abs=1e-6)
    # torchmetrics' MulticlassAUROC (what val/auroc used to be) gives the absent class 2 an AUC of 0 and averages it in:
    # (1 + .9444 + 0) / 3 = .6481, so training and `medseg evaluate` disagreed on such an epoch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = MulticlassAUROC(3, average="macro")(torch.from_numpy(p), torch.from_numpy(y)).item()
    assert old == pytest.approx((1.0 + 8.5 / 9) / 3, abs=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute before update
        assert np.isnan(ExactAUROC(3).compute().item())  # nothing seen


def test_logged_val_auroc_is_roc_auc_of_the_same_probabilities() -> None:
    torch.manual_seed(0)
    images = torch.randn(10, 1, 16, 16)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 0, 1, 1])  # class 2 absent: MulticlassAUROC would count it as 0
    batches = [{"image": images[i:i + 4], "label": labels[i:i + 4]} for i in range(0, 10, 4)]  # 4, 4, 2
    model = ClassificationModule(network="cnn3d", spatial_dims=2, num_classes=3, network_args={"channels": [4, 8]})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    logged = trainer.validate(model, dataloaders=loader, verbose=False)[0]["val/auroc"]
    model.eval()
    with torch.no_grad():
        probabilities = torch.softmax(model(images).float(), dim=1).numpy()
    assert logged == pytest.approx(roc_auc(labels.numpy(), probabilities)[0], abs=1e-6)
    assert {"val/acc", "val/f1", "val/auroc"} <= trainer.logged_metrics.keys()
