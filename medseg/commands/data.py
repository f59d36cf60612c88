"""``medseg make-synthetic`` and ``medseg check-data``: neither imports Lightning."""

from __future__ import annotations

import argparse

from medseg.commands.common import CommandError, doc, max_voxels_option

TEST_CASES = 4  # held-out cases in imagesTs/ by default, so that `medseg predict --input DATA/imagesTs` works


def make_synthetic(argv: list[str]) -> int:
    """``medseg make-synthetic ARGS``: write a synthetic Decathlon-style dataset."""
    parser = argparse.ArgumentParser(prog="medseg make-synthetic", description=doc("make-synthetic"))
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=None,
                        help="2 or 3 (default 3; 2 for --task enhance, whose phantoms are 2D)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--classes", type=int, default=2, help="classes including background for seg")
    parser.add_argument("--task", choices=("seg", "cls", "multitask", "enhance"), default="seg",
                        help="seg, cls, multitask (a label map and an image-level class per case), or enhance "
                             "(degraded ultrasound-like images paired with clean targets and lesion label maps)")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--test-cases", type=int, default=TEST_CASES,
                        help=f"held-out cases written to imagesTs/ with their labels (default {TEST_CASES})")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="image shape, e.g. 48 48 24")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regions", action="store_true",
                        help="nested structures (labels 1 > 2 > 3) with overlapping regions whole/core/inner")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, help="voxel size in mm, e.g. 0.7 0.7 5")
    parser.add_argument("--modality", choices=("mri", "ct"), default="mri",
                        help="ct: Hounsfield units, air around a soft-tissue body (channel name CT)")
    parser.add_argument("--structure-scale", type=float, default=1.0,
                        help="factor on the structures' radii, e.g. 0.4 for small lesion-like structures")
    args = parser.parse_args(argv)
    if args.dims is None:
        args.dims = 2 if args.task == "enhance" else 3
    if args.regions and args.task != "seg":
        parser.error("--regions is for --task seg")
    if args.task in ("multitask", "enhance"):
        return _make_paired(args)
    from medseg.data.synthetic import make_synthetic as write

    try:
        path = write(
            args.out, dims=args.dims, cases=args.cases, classes=args.classes, task=args.task, seed=args.seed,
            size=args.size, channels=args.channels, test_cases=args.test_cases, regions=args.regions,
            spacing=args.spacing, modality=args.modality, structure_scale=args.structure_scale,
        )
    except ValueError as err:  # a size the structures cannot fit in, a negative seed, ...
        raise CommandError(str(err)) from err
    held_out = f" + {args.test_cases} test cases (imagesTs/)" if args.test_cases else ""
    print(f"wrote {args.cases} cases{held_out}: {path}")
    return 0


def _make_paired(args: argparse.Namespace) -> int:
    """``make-synthetic --task multitask|enhance``: the datasets of the multitask and enhancement tasks."""
    if args.task == "enhance":
        from medseg.data.synthetic_enhance import make_enhancement as write
    else:
        from medseg.data.synthetic_multitask import make_multitask as write
    try:
        path = write(args.out, dims=args.dims, cases=args.cases, seed=args.seed, size=args.size,
                     test_cases=args.test_cases)
    except ValueError as err:
        raise CommandError(str(err)) from err
    held_out = f" + {args.test_cases} test cases (imagesTs/)" if args.test_cases else ""
    print(f"wrote {args.cases} {args.task} cases{held_out}: {path}")
    return 0


def check_data(argv: list[str]) -> int:
    """``medseg check-data ROOT``: read every case and report every problem; exit code 1 when there is one."""
    parser = argparse.ArgumentParser(prog="medseg check-data", description=doc("check-data"))
    parser.add_argument("root", help="dataset folder (with dataset.json / dataset.csv) or the description file")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="affine/spacing tolerance")
    max_voxels_option(parser)
    args = parser.parse_args(argv)
    from medseg.data.checks import check_counted, format_report

    problems, n_cases = check_counted(args.root, tolerance=args.tolerance, progress=True, max_voxels=args.max_voxels)
    print(format_report(problems, n_cases))
    return 1 if problems else 0
