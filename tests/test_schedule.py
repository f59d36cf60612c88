"""The learning-rate schedule is as long as the fit in force: max_epochs, max_steps or max_time, resumes included."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, Timer

from medseg.cli import main
from medseg.errors import ConfigError
from medseg.lightning_cli import MedSegCLI
from medseg.tasks.schedule import Annealing, FitLimits, FitProgress, lr_factor

CONFIG = Path(__file__).parents[1] / "configs" / "seg2d_unet.yaml"
BASE_LR = 0.003  # configs/seg2d_unet.yaml
TINY = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "1",
        "--data.patch_size", "[32, 32]", "--model.init_args.network_args", '{"channels": [4, 8]}']


class StopAfterEpoch(Callback):
    """Stops the fit at the end of epoch ``epoch`` (last.ckpt is written there), as an interrupted run."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _fit(root: Path, out: Path, *extra: str) -> MedSegCLI:
    return MedSegCLI(args=["fit", "--config", str(CONFIG), "--data.root", str(root),
                           "--trainer.default_root_dir", str(out), *TINY, *extra])


def _logged_lrs(cli: MedSegCLI) -> list[tuple[int, float]]:
    """``(step, learning rate)`` rows LearningRateMonitor wrote to the run's metrics.csv (one an epoch)."""
    rows = csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open())
    return [(int(row["step"]), float(row["lr-AdamW"])) for row in rows if row.get("lr-AdamW")]


def _final_lr(cli: MedSegCLI) -> float:
    return float(cli.trainer.optimizers[0].param_groups[0]["lr"])


@pytest.fixture
def medseg_log() -> Iterator[list[str]]:
    """Messages of the ``medseg`` logger during the test (it may not propagate to pytest's handler)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    medseg_logger = logging.getLogger("medseg")
    level = medseg_logger.level
    medseg_logger.addHandler(handler)
    medseg_logger.setLevel(logging.INFO)
    yield messages
    medseg_logger.removeHandler(handler)
    medseg_logger.setLevel(level)


# ---- the curve ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("progress", "arguments", "expected"),
    [
        (0.0, {}, 1.0),
        (0.25, {}, (1 + math.sqrt(0.5)) / 2),  # cos(pi/4) = sqrt(1/2)
        (0.5, {}, 0.5),
        (1.0, {}, 0.0),
        (1.7, {}, 0.0),  # clipped: past the end stays at the minimum, never climbs back
        (0.5, {"min_lr_ratio": 0.1}, 0.1 + 0.9 * 0.5),
        (1.0, {"min_lr_ratio": 0.1}, 0.1),
        (0.5, {"kind": "poly"}, 0.5 ** 0.9),
        (0.75, {"kind": "poly"}, 0.25 ** 0.9),
        (1.0, {"kind": "poly"}, 0.0),
        (0.05, {"warmup": 0.1}, 0.5),  # half-way up the linear warmup
        (0.1, {"warmup": 0.1}, 1.0),
        (0.55, {"warmup": 0.1}, 0.5),  # half-way through the decay that follows the warmup
        (0.55, {"warmup": 0.1, "kind": "poly"}, 0.5 ** 0.9),
    ],
)
def test_factor_follows_the_hand_computed_curve(progress: float, arguments: dict, expected: float) -> None:
    assert lr_factor(progress, **arguments) == pytest.approx(expected, abs=1e-12)


def test_scheduler_sets_every_group_from_progress_and_saves_plain_state(tmp_path: Path) -> None:
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": weights[:1], "lr": 0.1}, {"params": weights[1:], "lr": 0.02}])
    scheduler = Annealing(optimizer, kind="poly", min_lr_ratio=0.2)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.02])
    scheduler.progress = 0.5
    optimizer.step()
    scheduler.step()
    factor = 0.2 + 0.8 * 0.5 ** 0.9
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * factor, 0.02 * factor])
    torch.save(scheduler.state_dict(), tmp_path / "state.pt")  # goes into checkpoints loaded weights_only
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["progress"] == 0.5 and state["kind"] == "poly"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"kind": "linear"}, "kind 'linear'"), ({"warmup": 1.0}, "warmup 1.0"), ({"min_lr_ratio": -0.1}, "min_lr_ratio")],
)
def test_bad_arguments_are_refused_naming_them(arguments: dict, message: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match=message):
        Annealing(optimizer, **arguments)


# ---- progress: steps, time, both -----------------------------------------------------------------------------

def test_progress_is_the_larger_of_the_step_and_time_fractions() -> None:
    assert FitLimits(total_steps=200, max_seconds=None).progress(50, 1e6) == 0.25
    assert FitLimits(total_steps=None, max_seconds=150.0).progress(10**6, 75.0) == 0.5
    both = FitLimits(total_steps=200, max_seconds=150.0)
    assert both.progress(50, 75.0) == 0.5 and both.progress(150, 75.0) == 0.75
    assert both.progress(400, 300.0) == 1.0


class FakeClock:
    """Stands in for the ``time`` module Lightning's Timer reads ``monotonic()`` from."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_time_progress_is_the_timer_clock_and_continues_after_a_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("pytorch_lightning.callbacks.timer.time", clock)
    timer = Timer(duration="00:00:02:30", interval="step")  # what --trainer.max_time 00:00:02:30 adds
    trainer = SimpleNamespace(callbacks=[timer], estimated_stepping_batches=float("inf"))
    timer.load_state_dict({"time_elapsed": {"train": 60.0}})  # a resume after 60 s of training
    progress = FitProgress(trainer)  # type: ignore[arg-type]
    assert progress.limits == FitLimits(total_steps=None, max_seconds=150.0) and progress.timer is timer

    timer.on_train_start(trainer, None)  # type: ignore[arg-type]
    clock.now += 15.0
    assert progress(global_step=10**6) == pytest.approx(75.0 / 150.0)  # no step limit: steps do not count
    clock.now += 75.0  # the moment the Timer stops the fit is the moment the schedule reaches its end
    assert timer.time_remaining() <= 0 and progress(global_step=0) == 1.0


def test_steps_and_time_both_count_when_both_limit_the_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("pytorch_lightning.callbacks.timer.time", clock)
    timer = Timer(duration={"seconds": 100})
    progress = FitProgress(SimpleNamespace(callbacks=[timer], estimated_stepping_batches=400))  # type: ignore[arg-type]
    timer.on_train_start(None, None)  # type: ignore[arg-type]
    clock.now += 10.0
    assert progress(global_step=200) == 0.5  # steps ahead of time
    clock.now += 65.0
    assert progress(global_step=200) == 0.75  # time ahead of steps


def test_a_fit_without_any_limit_is_refused_naming_the_fix(seg2d_root: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fit", "--config", str(CONFIG), "--data.root", str(seg2d_root), "--trainer.default_root_dir",
                 str(tmp_path), *TINY, "--trainer.max_epochs", "-1"])
    assert code == 2
    assert "set --trainer.max_epochs N or --trainer.max_time" in capsys.readouterr().err


# ---- real fits -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epochs", [2, 4])
def test_max_epochs_override_sets_the_schedule_length(epochs: int, seg2d_root: Path, tmp_path: Path,
                                                      medseg_log: list[str]) -> None:
    cli = _fit(seg2d_root, tmp_path, "--trainer.max_epochs", str(epochs),
               "--trainer.check_val_every_n_epoch", str(epochs))
    total = cli.trainer.global_step
    assert total == epochs * cli.trainer.num_training_batches
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"  # a smooth curve, not a staircase of epochs
    assert any(f"over {total} optimizer steps" in message for message in medseg_log)
    lrs = _logged_lrs(cli)
    assert [step for step, _ in lrs] == [e * total // epochs for e in range(epochs)]  # one row an epoch
    for step, lr in lrs:
        assert lr == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * step / total)), rel=1e-6)
    if epochs == 4:  # twice as many epochs: at epoch 2, half-way down the cosine
        assert lrs[2][1] == pytest.approx(BASE_LR / 2, rel=1e-6)
    assert _final_lr(cli) == pytest.approx(0.0, abs=1e-12)  # annealed at the end, not climbing back


def test_max_time_fit_ends_annealed(seg2d_root: Path, tmp_path: Path, medseg_log: list[str]) -> None:
    # The config's max_epochs 50 would take far longer: the 3 s time limit ends this fit, and the schedule.
    # No validation: it would take most of these 3 s.
    cli = _fit(seg2d_root, tmp_path, "--trainer.max_time", "00:00:00:03", "--trainer.check_val_every_n_epoch", "1000")
    assert cli.trainer.current_epoch < 50 and cli.model._fit_progress.timer.time_remaining() <= 0  # time ended it
    assert any("or 3 s of training, whichever comes first" in message for message in medseg_log)
    lrs = [lr for _, lr in _logged_lrs(cli)]
    assert lrs[0] == pytest.approx(BASE_LR)
    assert all(later <= earlier for earlier, later in pairwise(lrs))
    # The schedule's last step comes just before the Timer's check that stops the fit: at most a callback's
    # time short of the end, where the cosine is flat (a 5 % shortfall would still leave 0.6 % of the rate).
    assert _final_lr(cli) <= 0.01 * BASE_LR


def test_resume_continues_the_schedule(seg2d_root: Path, tmp_path: Path) -> None:
    common = ["--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "2",
              "--trainer.max_time", "00:01:00:00"]  # an hour: the step fraction leads, the Timer is saved
    stopper = json.dumps({"class_path": "tests.test_schedule.StopAfterEpoch", "init_args": {"epoch": 1}})
    first = _fit(seg2d_root, tmp_path, *common, "--trainer.callbacks+", stopper)
    assert first.trainer.current_epoch == 2  # stopped after epochs 0 and 1
    checkpoint = torch.load(Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    saved_seconds = checkpoint["callbacks"]["Timer"]["time_elapsed"]["train"]

    resumed = _fit(seg2d_root, tmp_path, *common, "--ckpt_path", "last")
    total = resumed.trainer.global_step
    assert total == 4 * resumed.trainer.num_training_batches
    # The schedule's clock went on from the checkpoint's time, not from 0 (the Timer stopped at the fit's end).
    timer = resumed.model._fit_progress.timer
    assert timer.time_elapsed() > saved_seconds
    assert resumed.model._fit_progress(0) * 3600 == pytest.approx(timer.time_elapsed(), abs=0.01)
    lrs = _logged_lrs(resumed)  # the same metrics.csv: both runs' rows
    assert [step for step, _ in lrs] == [e * total // 4 for e in range(4)]
    for step, lr in lrs:  # one cosine over the 4 epochs: after the resume at epoch 2, half the rate, not all of it
        assert lr == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * step / total)), rel=1e-6)
    assert _final_lr(resumed) == pytest.approx(0.0, abs=1e-12)


# ---- torch schedulers given in the config --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spec", "length"),
    [
        ('{"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 50}}', "T_max"),
        ('{"class_path": "torch.optim.lr_scheduler.PolynomialLR", "init_args": {"total_iters": 50}}', "total_iters"),
    ],
)
def test_epoch_schedulers_take_the_max_epochs_in_force(spec: str, length: str, seg2d_root: Path, tmp_path: Path,
                                                       medseg_log: list[str]) -> None:
    cli = _fit(seg2d_root, tmp_path, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "2",
               "--model.init_args.scheduler", spec)
    config = cli.trainer.lr_scheduler_configs[0]
    assert config.interval == "epoch" and getattr(config.scheduler, length) == 2
    assert any(f"{length} 50 -> 2 (trainer.max_epochs)" in message for message in medseg_log)
    assert _final_lr(cli) == pytest.approx(0.0, abs=1e-12)  # annealed after the 2 epochs, not 2/50 of the way
