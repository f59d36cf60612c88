"""Members accumulated in place agree with stacking every member: mean, variance, votes, groups, inversions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.data.datalist import load_dataset
from medseg.inference import pipeline
from medseg.inference.accumulate import NativeAccumulator
from medseg.inference.ensemble import combine
from medseg.inference.members import Layout, MemberWindows
from medseg.inference.native import LoadedModel, flip_sets
from medseg.inference.outputs import OutputSpec
from medseg.inference.window import Window, stitch

SOFTMAX3 = OutputSpec("softmax", ("background", "a", "b"))


def _nets(count: int, seed: int) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [torch.nn.Conv3d(1, 3, 3, padding=1).eval() for _ in range(count)]


def _stacked(nets: list[torch.nn.Module], flips: list[tuple[int, ...]], x: torch.Tensor) -> np.ndarray:
    """The reference: every member's probabilities, flipped back, stacked ``(M, K, *S)``."""
    members = []
    with torch.no_grad():
        for net in nets:
            for flip in flips:
                dims = [a + 2 for a in flip]
                p = torch.softmax(net(torch.flip(x, dims) if dims else x), dim=1)
                members.append((torch.flip(p, dims) if dims else p)[0].numpy())
    return np.stack(members)


def _whole_image(nets: list[torch.nn.Module], flips: list[tuple[int, ...]], layout: Layout, x: torch.Tensor) -> torch.Tensor:
    """Statistics of the members stitched from one window covering the whole image ``(layout.size, *S)``."""
    predictor = MemberWindows(nets, flips, SOFTMAX3, layout)
    with torch.no_grad():
        return stitch(predictor, x, Window(tuple(x.shape[2:])), layout.size)[0]


def test_one_group_equals_stacking_every_member() -> None:
    x = torch.randn(1, 1, 12, 10, 8, generator=torch.Generator().manual_seed(0))
    nets, flips = _nets(2, seed=0), flip_sets(3)
    layout = Layout(3, variance=True, votes=True, foreground=True)
    stats = _whole_image(nets, flips, layout, x).numpy()
    stack = _stacked(nets, flips, x)  # (16, 3, *S)
    assert np.allclose(stats[layout.mean], stack.mean(axis=0), atol=1e-6)
    assert np.allclose(stats[layout.m2] / (16 * 3), stack.var(axis=0).mean(axis=0), atol=1e-6)
    votes = torch.from_numpy(stats[layout.vote])
    ours = SOFTMAX3.decode_votes(votes, torch.from_numpy(stats[layout.mean]), members=16).numpy()
    assert np.array_equal(ours, combine(list(stack), "vote")[1])
    assert np.array_equal(stats[layout.any_foreground] > 0, (stack.argmax(axis=1) > 0).any(axis=0))
    plain = _whole_image(nets, flips, Layout(3), x).numpy()  # no M2 kept: the mean is a sum divided once
    assert plain.shape == (3, *x.shape[2:]) and np.allclose(plain, stack.mean(axis=0), atol=1e-6)


def test_groups_combine_like_one_stack() -> None:
    """Two groups (2 + 1 networks) folded on the native grid: Chan's rule gives the variance of all members."""
    x = torch.randn(1, 1, 10, 9, 6, generator=torch.Generator().manual_seed(1))
    flips = flip_sets(3, [0, 2])
    nets = _nets(3, seed=1)
    layout = Layout(3, variance=True, votes=True, foreground=True)
    accumulator = NativeAccumulator(layout, SOFTMAX3)
    for group in (nets[:2], nets[2:]):
        stats = _whole_image(group, flips, layout, x).numpy()
        accumulator.add_group(lambda c, s=stats: s[c].copy(), len(group) * len(flips))
    stack = _stacked(nets, flips, x)  # (12, 3, *S)
    maps = accumulator.finish(probabilities=True, uncertainty=True)
    assert maps.members == 12
    assert np.allclose(maps.probabilities, stack.mean(axis=0), atol=1e-6)
    assert np.allclose(maps.variance, stack.var(axis=0).mean(axis=0), atol=1e-6)
    assert np.array_equal(maps.labels, combine(list(stack), "vote")[1])  # the layout keeps votes: vote mode
    entropy = -(stack.mean(0) * np.log(np.clip(stack.mean(0), 1e-12, 1))).sum(0)
    assert np.allclose(maps.entropy, entropy, atol=1e-5)
    region = (stack.argmax(axis=1) > 0).any(axis=0)
    assert maps.doubt == pytest.approx(float(entropy[region].mean()), abs=1e-5)


class Threshold(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10


@pytest.mark.parametrize("count", [1, 2])
def test_a_group_inverts_once_per_channel_whatever_its_members(count: int, seg3d_root: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory does not grow with the ensemble: 1 or 2 models x 8 flips, the same few channels inverted."""
    calls = []
    real = pipeline.invert_channel
    monkeypatch.setattr(pipeline, "invert_channel", lambda *a: calls.append(1) or real(*a))
    hparams = {"network": "t", "spatial_dims": 3, "in_channels": 1, "num_classes": 2, "roi_size": [16, 16, 8],
               "preprocessing_spec": {"intensity": "mri"}}
    models = [LoadedModel(Threshold(), dict(hparams), "segmentation") for _ in range(count)]
    groups = pipeline.group_models(models)
    assert len(groups) == 1
    case = pipeline.prepare_case({"id": "c", "image": load_dataset(seg3d_root).training[0]["image"]}, groups)
    maps = pipeline.segment(case, groups, flip_sets(3), uncertainty=True)
    assert maps.members == 8 * count
    assert len(calls) == 4  # 2 class means, M2 (several members), the foreground flag: not x members


def test_regions_decode_in_order_and_later_regions_overwrite() -> None:
    """nnU-Net's rule: start from 0, then each region above 0.5 writes its value, in order."""
    spec = OutputSpec("sigmoid", ("whole", "core", "inner"), ((1, 2, 3), (2, 3), (3,)), (1, 2, 3))
    p = torch.tensor([[0.9, 0.9, 0.9, 0.2, 0.6],   # whole
                      [0.1, 0.8, 0.8, 0.1, 0.1],   # core
                      [0.1, 0.1, 0.7, 0.1, 0.9]])  # inner (voxel 4: inside "inner" but outside "core")
    assert spec.decode(p).tolist() == [1, 2, 3, 0, 3]
    labels = torch.tensor([0, 1, 2, 3])
    assert spec.masks(labels).int().tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert spec.metric_suffixes == ["region1", "region2", "region3"] and spec.structures == ["whole", "core", "inner"]
    # Votes of 4 members: a region is on with more than half of the votes; 2 of 4 is a tie, decided by the mean.
    votes = torch.tensor([[4.0, 2.0, 2.0], [0.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    mean = torch.tensor([[0.9, 0.6, 0.4], [0.1, 0.6, 0.4], [0.1, 0.1, 0.3]])
    assert spec.decode_votes(votes, mean, members=4).tolist() == [1, 2, 0]


def test_softmax_votes_break_ties_by_the_mean_probability() -> None:
    votes = torch.tensor([[2.0, 1.0], [2.0, 1.0], [0.0, 2.0]])  # voxel 0: classes 0 and 1 tie at 2 votes
    mean = torch.tensor([[0.4, 0.3], [0.5, 0.3], [0.1, 0.4]])
    assert SOFTMAX3.decode_votes(votes, mean, members=4).tolist() == [1, 2]


def test_sigmoid_class_models_take_the_argmax_and_softmax_ones_too() -> None:
    p = torch.tensor([[0.9, 0.2], [0.4, 0.7]])
    assert OutputSpec("sigmoid", ("bg", "a")).decode(p).tolist() == [0, 1]
    assert OutputSpec("softmax", ("bg", "a")).decode(p).tolist() == [0, 1]


def test_loss_logits_give_back_the_probabilities() -> None:
    p = torch.tensor([[0.2, 0.7], [0.8, 0.3]])
    assert torch.allclose(torch.softmax(OutputSpec("softmax", ("a", "b")).logits_for_loss(p), dim=0), p)
    assert torch.allclose(torch.sigmoid(OutputSpec("sigmoid", ("a", "b")).logits_for_loss(p)), p, atol=1e-6)


def _reference_members(models: list[LoadedModel], image: str, flips: list[tuple[int, ...]]) -> np.ndarray:
    """Every member predicted alone, its probabilities inverted with MONAI's Invertd, voxels outside its
    preprocessed grid given to background, stacked ``(M, K, *S)``: the per-member reference."""
    from monai import transforms as mt
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference

    stack = []
    for model in models:
        preprocess = pipeline.preprocess_for(model)
        data = preprocess({"image": image})
        for flip in flips:
            dims = [a + 2 for a in flip]

            def member(w: torch.Tensor, dims: list[int] = dims, net: torch.nn.Module = model.net) -> torch.Tensor:
                p = torch.softmax(net(torch.flip(w, dims) if dims else w), dim=1)
                return torch.flip(p, dims) if dims else p

            with torch.no_grad():
                p = sliding_window_inference(data["image"].as_tensor()[None], model.hparams["roi_size"], 1, member,
                                             overlap=0.25, mode="gaussian")[0]
            inverted = mt.Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=False)(
                {**data, "pred": MetaTensor(p, meta=data["image"].meta)})["pred"]
            p = np.asarray(inverted, dtype=np.float32)
            p[0] += np.clip(1.0 - p.sum(axis=0), 0.0, None)
            stack.append(p)
    return np.stack(stack)


def test_a_cropping_group_and_a_full_group_vote_and_vary_like_every_member_alone(tmp_path: Path) -> None:
    """Group A crops to the foreground, group B does not: outside A's crop its members call background and must
    count there, in the mean, the votes and the variance (not as members that predicted nothing)."""
    from medseg.data.io import write_nifti

    rng = np.random.default_rng(0)
    image = np.zeros((20, 18, 10), np.float32)
    image[4:15, 3:14, 2:8] = rng.normal(1.0, 0.5, (11, 11, 6))
    affine = np.array([[-1.2, 0, 0, 10], [0, 0, 0.9, -5], [0, 2.0, 0, 3], [0, 0, 0, 1.0]])  # permuted, flipped
    path = str(write_nifti(image, affine, tmp_path / "box.nii.gz"))
    torch.manual_seed(0)

    def model(crop: bool) -> LoadedModel:
        net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Conv3d(3, 3, 1)).eval()
        hparams = {"network": "t", "spatial_dims": 3, "in_channels": 1, "num_classes": 3, "roi_size": [32, 32, 32],
                   "preprocessing_spec": {"intensity": "mri", "crop_foreground": crop}}
        return LoadedModel(net, hparams, "segmentation")

    models = [model(True) for _ in range(3)] + [model(False)]
    flips = flip_sets(3, [0])
    stack = _reference_members(models, path, flips)  # (8, 3, *S)
    groups = pipeline.group_models(models)
    assert len(groups) == 2
    for ensemble in ("mean", "vote"):
        case = pipeline.prepare_case({"id": "c", "image": [path]}, groups)
        maps = pipeline.segment(case, groups, flips, ensemble=ensemble, probabilities=True, uncertainty=True)
        assert np.allclose(maps.probabilities, stack.mean(axis=0), atol=1e-5)
        assert np.allclose(maps.variance, stack.var(axis=0).mean(axis=0), atol=1e-5)
        assert np.array_equal(maps.labels, combine(list(stack), ensemble)[1])
    mean = stack.mean(axis=0)
    entropy = -(mean * np.log(np.clip(mean, 1e-12, 1.0))).sum(axis=0)
    region = (stack.argmax(axis=1) > 0).any(axis=0)
    assert maps.doubt == pytest.approx(float(entropy[region].mean()), rel=1e-4)
