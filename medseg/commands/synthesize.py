"""``medseg synthesize``: new training pairs from a label-conditioned generator (lesion simulation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.commands.common import CommandError, count, doc, max_voxels_option

EPILOG = """\
Each pair takes a source label map (seeded: every source once before any twice), moves it without
interpolating a label (random flips, quarter turns in a plane whose two axes have the same size and voxel
size, an integer shift that keeps every structure inside the grid), and has the generator draw its image
with the checkpoint's sliding window, after the checkpoint's reorientation and resampling; the image is
resampled back to the label map's grid. Both files keep the source label map's affine.

Variability: --seed alone decides the sources' order, the placements and the generator's noise. A generator
with dropout keeps it active while drawing (pix2pix's noise), so one label map gives different images; one
without dropout gives one image per placement.

Train on real and synthetic cases at once:
  medseg synthesize --ckpt gen.ckpt --labels DATA --dataset DATA --count 50 --out SYNTH
  medseg fit --config configs/seg2d_unet.yaml --data.root SYNTH
"""


def parser() -> argparse.ArgumentParser:
    """The options of ``medseg synthesize``."""
    parser = argparse.ArgumentParser(prog="medseg synthesize", description=doc("synthesize"), epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="an enhancement checkpoint trained with condition: label (one-hot label map -> image)")
    parser.add_argument("--labels", required=True, metavar="SOURCE",
                        help="a dataset folder or description (its training label maps), or a folder of label maps")
    parser.add_argument("--count", required=True, type=count, help="pairs to write")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for imagesTr/synth_XXX.nii.gz, labelsTr/synth_XXX.nii.gz and dataset.json "
                             "(a segmentation dataset; each pair marked synthetic, naming its source label map)")
    parser.add_argument("--seed", type=int, default=0, help="sources' order, placements and dropout noise (default 0)")
    parser.add_argument("--dataset", default=None, metavar="ROOT",
                        help="also list ROOT's training cases (absolute paths) in DIR/dataset.json, so medseg fit "
                             "--data.root DIR trains on both; an enhancement dataset's clean targets are its images")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda[:N]")
    parser.add_argument("--overwrite", action="store_true", help="write into a DIR that holds files (replacing them)")
    max_voxels_option(parser)
    return parser


def run(argv: list[str]) -> int:
    """``medseg synthesize ARGS``."""
    args = parser().parse_args(argv)
    if args.seed < 0:
        raise CommandError(f"--seed must be 0 or more, got {args.seed}")
    from medseg.inference.batch import resolve_device
    from medseg.inference.synthesize import synthesize

    device = resolve_device(args.device)
    try:
        written = synthesize(args.ckpt, args.labels, args.count, args.out, seed=args.seed, dataset=args.dataset,
                             device=device, overwrite=args.overwrite, max_voxels=args.max_voxels)
    except ValueError as err:  # not a label-conditioned generator; InputError/DatasetError pass as they are
        raise CommandError(str(err)) from err
    real = written["numTraining"] - args.count
    listed = f" and {real} real case(s)" if real else ""
    print(f"wrote {args.count} synthetic pair(s){listed}: {Path(args.out) / 'dataset.json'}; train on them with "
          f"medseg fit --data.root {args.out}")
    return 0
