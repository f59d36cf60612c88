"""``medseg serve``: an HTTP service for exported models (``/predict``, an A/B split, ``/metrics``, a viewer).

One process: uvicorn runs the FastAPI app (:mod:`medseg.serve.app`) on ``--host``/``--port``; ``--workers``
inference threads share the loaded models, ``--queue`` more requests may upload or wait, more are answered 503
before their upload is read; ``--max-voxels`` bounds an image and ``--max-voxels-in-flight`` the voxels predicted
at once (memory), ``--upload-timeout`` the time an upload may take. Every
``/predict`` request is a row of the CSV request log (``--log``, default ``serve_requests.csv`` in the current
folder; its columns are listed in :mod:`medseg.serve.requests_log`), which ``medseg ab-report`` reads.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from medseg.commands.common import CommandError, count, doc

DEPLOY_MISSING = 'medseg serve needs FastAPI and uvicorn: pip install "medseg[deploy]"'


def parser() -> argparse.ArgumentParser:
    """The options of ``medseg serve``."""
    parser = argparse.ArgumentParser(prog="medseg serve", description=doc("serve"))
    parser.add_argument("--model", action="append", required=True, metavar="DIR",
                        help="a folder of medseg export (or a .ckpt); give two for an A/B test")
    parser.add_argument("--split", type=_fraction, default=0.5, metavar="P",
                        help="with two models: the share of requests for the second (by a stable hash of the "
                             "patient id, else the case id), default 0.5")
    parser.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                        help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                             "interface)")
    parser.add_argument("--port", type=int, default=8000, metavar="N", help="the port (default 8000)")
    parser.add_argument("--max-upload-mb", type=_positive, default=512.0, metavar="N",
                        help="the largest upload, in MiB (413 above; a DICOM zip may expand to 4 times this)")
    parser.add_argument("--upload-timeout", type=_positive, default=60.0, metavar="S",
                        help="seconds an upload's body may take to arrive; slower ones are answered 408 (default 60)")
    parser.add_argument("--workers", type=count, default=1, metavar="N",
                        help="inference threads sharing the models (default 1)")
    parser.add_argument("--queue", type=_non_negative, default=8, metavar="N",
                        help="requests that may upload or wait for a worker beyond --workers; more are answered "
                             "503 before their upload is read (default 8)")
    parser.add_argument("--log", default="serve_requests.csv", metavar="FILE.csv",
                        help="the request log, one row per /predict (default serve_requests.csv here; '' for none)")
    parser.add_argument("--keep-predictions", default=None, metavar="DIR",
                        help="also write each label map as DIR/<model>/<case>__<request>.nii.gz (the log's "
                             "prediction column holds its absolute path)")
    parser.add_argument("--keep-results", type=count, default=32, metavar="N",
                        help="how many results stay downloadable from /results (default 32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda[:N]")
    from medseg.serve.service import SERVE_MAX_VOXELS as limit  # no FastAPI: help answers without the extra

    parser.add_argument("--max-voxels", type=count, default=limit, metavar="N",
                        help="the most voxels an uploaded image's header may claim (422 above, before any voxel is "
                             "read). A prediction takes about 40 bytes of memory per voxel and a compressed upload "
                             f"can claim many (a 20 KB .nii.gz of zeros holds 160^3), so the default is {limit:,} "
                             "(512^3, about 5 GiB), lower than medseg predict's")
    parser.add_argument("--max-voxels-in-flight", type=count, default=None, metavar="N",
                        help="the most voxels predicted at once over all workers; a prediction waits until the "
                             "running ones leave room (default: --max-voxels, so memory stays that of one "
                             "largest image whatever --workers)")
    return parser


def run(argv: list[str]) -> int:
    """``medseg serve ARGS``: serves until interrupted (Ctrl-C); 0 then."""
    args = parser().parse_args(argv)
    if len(args.model) > 2:
        raise CommandError(f"--model given {len(args.model)} times: serve one model, or two for an A/B test")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise CommandError(DEPLOY_MISSING) from err
    import medseg
    from medseg.serve.app import create_app

    try:
        models = [medseg.load(path, device=args.device) for path in args.model]
    except ValueError as err:
        raise CommandError(str(err)) from err
    app = create_app(models, serve_options(args))
    config = server_config(app, args)
    shares = ", ".join(f"{arm.label} {arm.name} {arm.share:.0%}" for arm in app.state.service.router.arms)
    print(f"medseg serve: http://{config.host}:{config.port}/  ({shares}; log {args.log or 'none'})", flush=True)
    import uvicorn

    uvicorn.Server(config).run()
    return 0


def serve_options(args: argparse.Namespace) -> Any:
    """The app's :class:`~medseg.serve.service.ServeOptions` from the parsed options."""
    from medseg.serve.service import ServeOptions

    return ServeOptions(split=args.split, max_upload_mb=args.max_upload_mb, workers=args.workers, queue=args.queue,
                        log=Path(args.log) if args.log else None,
                        keep_predictions=Path(args.keep_predictions) if args.keep_predictions else None,
                        keep_results=args.keep_results, max_voxels=args.max_voxels,
                        max_voxels_in_flight=args.max_voxels_in_flight, upload_timeout_s=args.upload_timeout)


def server_config(app: Any, args: argparse.Namespace) -> Any:
    """uvicorn's configuration: the app on ``--host``/``--port`` only, one process (the models, the queue, the
    metrics and the A/B log live in it)."""
    import uvicorn

    return uvicorn.Config(app, host=args.host, port=args.port, workers=1, log_level="info", access_log=True,
                          timeout_graceful_shutdown=30)


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite positive number")
    return value


def _non_negative(text: str) -> int:
    """A whole number >= 0 (``count`` takes positive ones only)."""
    value = _number(text)
    if not (value.is_integer() and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(value)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
