"""``facemetric compare``: several training configurations, one budget, side by side.

``compare([a.toml, b.toml, ...], out_dir=..., budget_steps=N)`` trains each configuration
under the same conditions and plots how they converge:

- **same data**: one dataset is built (and its images verified) once, from the first
  configuration's ``[data]`` section, and given to every run; the runs' ``[data]`` sections
  (root, people file, folds, image size, minimum images) must agree (``data_root``
  overrides the root of all of them);
- **same seed** (``seed`` replaces each file's): with equal ``[batch]`` settings the runs
  see the same batches in the same order with the same augmentation, because the loop's
  sampler and augmentation seeds are functions of ``(seed, epoch, batch)`` only. With
  ``[data] num_workers = 0`` each run records a SHA-256 of the sample indices it read, in
  order (``RunResult.data_order``), so the table shows whether the order really matched;
- **same budget**: ``budget_steps`` replaces ``[train] max_steps``; ``budget_seconds``
  stops a run once its *training* time reaches it — whichever comes first. Training time
  excludes the held-out checks and starts at the first sample read (the loop's setup is not
  training; with ``num_workers > 0`` the read is not visible, and the setup counts); it
  includes writing the periodic checkpoints. A run stopped by time ends with a checkpoint
  of its last step (written after the clock stopped), so the weights the final evaluation
  scores are the ones ``RunResult.checkpoint`` holds;
- **held-out verification while training**: given ``eval_pairs`` (an LFW-format pairs file)
  and ``eval_root`` (aligned images), every ``eval_every`` steps — and at step 0 and at the
  end — an ``on_step`` hook embeds the pairs' distinct images with the current model in
  eval mode (no flip test, for speed) and records the k-fold accuracy (and, with
  ``progress``, prints it above the bar); the model goes back to training mode afterwards.
  Images are decoded once, up front. ``max_eval_pairs`` keeps an evenly spaced subset for
  these checks (both classes of a ``pairsDev*`` file, which lists matched pairs first) in
  interleaved folds. The final metrics use every pair, with the flip test.

Written to ``out_dir``: ``convergence.png`` (2×2 panels: training loss and held-out
accuracy against steps and against training wall time; the loss drawn as a running mean),
``comparison.md`` (the table: accuracy ± std, AUC, EER, TAR@FAR=1e-3, steps, wall time,
img/s, final loss, data-order digest) and ``metrics.json`` (every curve and number); each
run's own training output (checkpoints, ``log.csv``, ``loss_curve.png``) and its record
``compare_run.json`` in ``out_dir/<config name>/``.

**Resuming after a kill.** Running the same ``compare`` again on the same ``out_dir``
continues: each run checkpoints every ``checkpoint_every`` steps (the writes count in its
training time) and, right after each checkpoint, records its curves, held-out checks,
training time and data-order digest so far in ``compare_run.json`` (atomically). A run whose
record says finished is reused as it is (its final held-out scores are stored, so the
table is rebuilt without retraining); an unfinished one resumes from its checkpoint
exactly as ``facemetric train --resume`` does, and its curves continue from the record (a
checkpoint newer than the record — the process died between the two writes — is dropped
and its steps redone). The record also holds the run's settings (its configuration after
the overrides, the budget and the held-out settings): a folder whose record was written
with other settings is refused, and so is a folder with checkpoints but no record. A
configuration field added to facemetric after the record was written is read as its
default, so a record of a run that did not use it still matches.

Several seeds of one comparison, with mean ± std over seeds and seed-band plots:
:mod:`facemetric.experiments.seeds` (``facemetric compare --seeds``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from facemetric.atomic import atomic_write_text
from facemetric.evaluation.plots import _new_figure, _save_figure
from facemetric.evaluation.protocols import PairList, read_lfw_pairs, with_existing_images
from facemetric.evaluation.report import (
    _accuracy_text,
    _json_safe,
    _pct,
    _table,
    _tar_text,
    comparison_table,
)
from facemetric.evaluation.verification import VerificationReport, verification_report
from facemetric.inference import Encoder, ModelContract, TorchEncoder
from facemetric.training.builders import (
    add_aux_losses,
    build_loss,
    build_model,
    class_counts_of,
    pair_loss_names,
)
from facemetric.training.checkpoint import checkpoint_path, list_checkpoints
from facemetric.training.config import TrainConfig, config_from_dict, load_config
from facemetric.training.ema import WeightAverage
from facemetric.training.loop import DistributedContext, StepInfo, build_dataset, seed_everything
from facemetric.training.loop import train as train_run

logger = logging.getLogger(__name__)

#: ``[data]`` fields that must agree between the compared configurations.
_DATA_FIELDS = ("root", "people_file", "folds", "image_size", "min_images")
_TABLE_FAR = 1e-3
#: a run's record (module docstring, "Resuming after a kill"), in its output folder
RECORD_FILE = "compare_run.json"
_RECORD_VERSION = 1


class _OrderRecorder(Dataset):
    """``base`` unchanged, hashing every index read (in this process) in order; also notes
    when the first item was read (the end of the loop's setup).

    The digest is a chain, ``h ← SHA-256(h ‖ index as 8 bytes)`` from 32 zero bytes, so its
    state is two numbers (``state()``) that a resumed run starts from (``chain``, ``count``).
    """

    def __init__(self, base: Any, chain: str | None = None, count: int = 0) -> None:
        self.base = base
        self.targets = getattr(base, "targets", None)
        self.num_classes = getattr(base, "num_classes", None)
        self._chain = bytes(32) if chain is None else bytes.fromhex(chain)
        self.count = int(count)
        self.first_read: float | None = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        if self.first_read is None:
            self.first_read = time.perf_counter()
        self._chain = hashlib.sha256(
            self._chain + int(index).to_bytes(8, "little", signed=True)
        ).digest()
        self.count += 1
        return self.base[index]

    def hexdigest(self) -> str:
        """The digest of the indices read so far, in order."""
        return self._chain.hex()

    def state(self) -> dict[str, Any]:
        """What a resumed run's recorder starts from."""
        return {"chain": self._chain.hex(), "count": self.count}


@dataclass
class RunResult:
    """One configuration's run: its curves and final numbers.

    ``step_wall[i]`` is the training time (seconds, evaluation excluded) when step ``i + 1``
    ended; ``eval_steps``/``eval_wall``/``eval_accuracy`` are the held-out checks (step 0 =
    the initial model). ``final`` is the full held-out report (``None`` without eval pairs).
    ``stopped_by`` is ``"steps"`` (the budget or the config's length) or ``"time"``.
    """

    name: str
    config_path: Path
    output_dir: Path
    loss_name: str
    steps: int
    losses: list[float]
    step_wall: list[float]
    eval_steps: list[int] = field(default_factory=list)
    eval_wall: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    final: VerificationReport | None = None
    wall_seconds: float = 0.0
    eval_seconds: float = 0.0
    images_per_second: float = 0.0
    stopped_by: str = "steps"
    data_order: str | None = None
    checkpoint: Path | None = None

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of the steps (at least one)."""
        if not self.losses:
            return math.nan
        k = max(1, len(self.losses) // 10)
        return float(np.mean(self.losses[-k:]))


@dataclass(frozen=True)
class CompareResult:
    """The runs and the files written."""

    runs: tuple[RunResult, ...]
    plot: Path
    table: Path
    metrics_json: Path
    table_text: str

    def summary(self) -> str:
        return f"{self.table_text}\nplot: {self.plot}\ntable: {self.table}"


@dataclass(frozen=True)
class _HeldOut:
    """Decoded held-out images and the pairs over them (full set and monitoring subset)."""

    images: list[np.ndarray]
    ok: np.ndarray
    index_a: np.ndarray
    index_b: np.ndarray
    is_same: np.ndarray
    fold: np.ndarray
    monitor: np.ndarray  # pair indices used while training
    monitor_folds: np.ndarray
    failures: int


def _names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base, k = p.stem, 2
        name = base
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _check_same_data(configs: list[TrainConfig], names: list[str]) -> None:
    first = configs[0].data
    for name, cfg in zip(names[1:], configs[1:], strict=True):
        diff = [f for f in _DATA_FIELDS if getattr(cfg.data, f) != getattr(first, f)]
        if diff:
            detail = ", ".join(
                f"{f}: {getattr(first, f)!r} vs {getattr(cfg.data, f)!r}" for f in diff
            )
            raise ValueError(
                f"configs {names[0]!r} and {name!r} train on different data ({detail}); "
                "compared runs must share [data]"
            )


def _load_held_out(
    pairs_file: Path, root: Path, folds: int, max_pairs: int | None
) -> _HeldOut:
    """Decode the pairs' distinct images once (each model resizes them to its own size)."""
    from facemetric.data.images import ImageLoadError, load_image

    pairs: PairList = with_existing_images(read_lfw_pairs(pairs_file, root, folds))
    paths, index_a, index_b = pairs.unique_images()
    images: list[np.ndarray] = []
    ok = np.ones(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path))
        except ImageLoadError as err:
            logger.warning("held-out image %s left out: %s", err.path, err.reason)
            ok[i] = False
    usable = ok[index_a] & ok[index_b]
    if not usable.any():
        raise ValueError(f"no pair of {pairs_file} has both images loadable under {root}")
    kept = np.flatnonzero(usable)
    if max_pairs is not None and max_pairs < kept.shape[0]:
        if max_pairs < 2 * folds:
            raise ValueError(f"max_eval_pairs must be at least {2 * folds} for {folds} folds")
        monitor = kept[np.unique(np.linspace(0, kept.shape[0] - 1, max_pairs).round()
                                 .astype(np.int64))]
        monitor_folds = np.arange(monitor.shape[0], dtype=np.int64) % folds
    else:
        monitor, monitor_folds = kept, pairs.fold[kept]
    return _HeldOut(images, ok, index_a, index_b, pairs.is_same, pairs.fold, monitor,
                    monitor_folds, int((~ok).sum()))


def _held_out_scores(encoder: Encoder, held: _HeldOut) -> np.ndarray:
    emb = np.full((held.ok.shape[0], 1), np.nan)
    good = encoder.embed_faces(held.images) if held.images else None
    if good is not None:
        emb = np.full((held.ok.shape[0], good.shape[1]), np.nan)
        emb[held.ok] = good
    return np.einsum("ij,ij->i", emb[held.index_a], emb[held.index_b])


def _monitor_accuracy(encoder: Encoder, held: _HeldOut) -> float:
    scores = _held_out_scores(encoder, held)[held.monitor]
    return verification_report(scores, held.is_same[held.monitor], held.monitor_folds,
                               far_targets=()).accuracy


def _final_report(scores: np.ndarray, held: _HeldOut) -> VerificationReport:
    """The full held-out report from every pair's score (``NaN``: an unloadable image)."""
    valid = np.isfinite(scores)
    return verification_report(scores[valid], held.is_same[valid], held.fold[valid])


def _contract(config: TrainConfig, flip: bool) -> ModelContract:
    """The contract of a model while it trains (its weights change: no checksum yet)."""
    return ModelContract(
        backbone=config.model.name, input_size=config.data.image_size, template="arcface112",
        embedding_size=config.model.embedding_size, weights_sha256="in-training",
        flip_test=flip, source="training",
    )


def _fingerprint(config: TrainConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """What a run's record must match to be reused or resumed: the run's configuration
    after compare's overrides, and the compare settings that shape its result."""
    return json.loads(json.dumps({"config": config.to_dict(), **settings}, default=str))


def _with_current_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """A record's settings with its configuration read back as a configuration: a field
    added to the configuration since the record was written takes its default, so a
    record of a run that used no such feature still matches (a newer version of facemetric
    can resume an older compare). A configuration that no longer reads is left as it is."""
    stored = settings.get("config")
    if not isinstance(stored, dict):
        return settings
    try:
        config = config_from_dict(stored, source="compare record")
    except (ValueError, TypeError):
        return settings
    return _fingerprint(config, {k: v for k, v in settings.items() if k != "config"})


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} cannot be read ({err}); remove the run's folder {path.parent} to train "
            "that run again"
        ) from err
    if not isinstance(record, dict) or record.get("version") != _RECORD_VERSION:
        raise ValueError(f"{path} is not a compare run record of version {_RECORD_VERSION}")
    return record


def _floats(values: Any) -> list[float | None]:
    """JSON-safe: NaN/Inf become ``None`` (finite floats round-trip exactly)."""
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def _unfloats(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _write_record(path: Path, result: RunResult, fingerprint: dict[str, Any],
                  recorder: _OrderRecorder, *, finished: bool,
                  final_scores: np.ndarray | None = None) -> None:
    record: dict[str, Any] = {
        "version": _RECORD_VERSION, "settings": fingerprint,
        "status": "finished" if finished else "running", "step": result.steps,
        "losses": result.losses, "step_wall": result.step_wall,
        "eval_steps": result.eval_steps, "eval_wall": result.eval_wall,
        "eval_accuracy": result.eval_accuracy, "eval_seconds": result.eval_seconds,
        "order": recorder.state(),
    }
    if finished:
        record.update(
            stopped_by=result.stopped_by, wall_seconds=result.wall_seconds,
            images_per_second=result.images_per_second, data_order=result.data_order,
            checkpoint=None if result.checkpoint is None else str(result.checkpoint),
            final_scores=None if final_scores is None else _floats(final_scores),
        )
    atomic_write_text(path, json.dumps(record, allow_nan=False) + "\n")


def _prepare_folder(out_dir: Path, record: dict[str, Any] | None, name: str) -> int:
    """The step an unfinished run resumes from (0: from scratch), after removing the
    checkpoints its record does not cover."""
    found = list_checkpoints(out_dir)
    if record is None:
        if found:
            raise FileExistsError(
                f"{out_dir} holds checkpoints but no {RECORD_FILE}: not a compare run (or one "
                f"written before compare could resume); choose another output folder for "
                f"{name!r} or remove that one"
            )
        return 0
    step = int(record["step"])
    if step > 0 and step not in {s for s, _ in found}:
        logger.warning("compare: %s: the checkpoint of step %d recorded in %s is missing; "
                       "training that run again from the start", name, step, RECORD_FILE)
        step = 0
    for s, path in found:
        if s > step:  # written after the record: the process died between the two writes
            path.unlink()
    return step


def _run_one(
    name: str,
    config_path: Path,
    config: TrainConfig,
    dataset: Any,
    held: _HeldOut | None,
    *,
    budget_seconds: float | None,
    eval_every: int,
    progress: bool,
    settings: dict[str, Any],
) -> RunResult:
    out_dir = Path(config.output_dir)
    record_path = out_dir / RECORD_FILE
    fingerprint = _fingerprint(config, settings)
    record = _read_record(record_path)
    if record is not None:
        record["settings"] = _with_current_defaults(record["settings"])
    if record is not None and record["settings"] != fingerprint:
        theirs, ours = record["settings"], fingerprint
        differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        raise ValueError(
            f"{record_path} was written by a compare with other settings (they differ in "
            f"{differ}); rerun with the same settings to resume, or use another output folder"
        )
    result = RunResult(name, config_path, out_dir, config.loss.name, 0, [], [])
    if record is not None and record["status"] == "finished":
        logger.info("compare: %s finished earlier (%s): reused", name, record_path)
        return _reused(result, record, held)
    resume_step = _prepare_folder(out_dir, record, name)
    resumed = record if resume_step > 0 else None
    if resumed is not None:
        logger.info("compare: %s resumes from step %d", name, resume_step)
        steps = resume_step
        result.steps = steps
        result.losses = [float(v) for v in resumed["losses"][:steps]]
        result.step_wall = [float(v) for v in resumed["step_wall"][:steps]]
        kept = [i for i, s in enumerate(resumed["eval_steps"]) if s <= steps]
        result.eval_steps = [int(resumed["eval_steps"][i]) for i in kept]
        result.eval_wall = [float(resumed["eval_wall"][i]) for i in kept]
        result.eval_accuracy = [float(resumed["eval_accuracy"][i]) for i in kept]
        result.eval_seconds = float(resumed["eval_seconds"])
        recorder = _OrderRecorder(dataset, **resumed["order"])
    else:
        recorder = _OrderRecorder(dataset)
    num_classes = int(getattr(dataset, "num_classes", int(np.max(dataset.targets)) + 1))
    # Exactly what train() does before its first step, so the initial weights are the ones
    # a plain ``facemetric train`` would start from; kept here to evaluate and to survive
    # a wall-time stop. (Resuming, train() loads the checkpoint into them.)
    seed_everything(config.seed)
    model = build_model(config.model)
    counts = class_counts_of(dataset.targets, num_classes)
    loss = add_aux_losses(
        build_loss(config.loss, num_classes, config.model.embedding_size, counts),
        config.aux_loss, num_classes, config.model.embedding_size, counts,
    )
    device = DistributedContext().device(config.train.device)
    # With [train] ema_decay the run is judged by its average of the weights (what its
    # checkpoints hold as "model"), copied into a model of its own before each evaluation.
    averaged = (WeightAverage(model, config.train.ema_decay)
                if config.train.ema_decay > 0 else None)
    judged = model if averaged is None else copy.deepcopy(model)
    # One model, two views of it: no flip test while monitoring (cheap), flip test at the end.
    monitor_encoder, final_encoder = (
        TorchEncoder(judged, _contract(config, flip), device=device,
                     channels_last=config.train.channels_last)
        for flip in (False, True)
    )

    def sync_average() -> None:
        if averaged is not None:
            judged.load_state_dict(averaged.state_dict())
    # training time already spent (resuming) and time to leave out of it from now on
    clock = {"start": 0.0, "eval": 0.0, "paused": 0.0,
             "before": result.step_wall[-1] if resumed else 0.0}

    def check(step: int, train_time: float) -> None:
        if held is None:
            return
        t = time.perf_counter()
        sync_average()
        accuracy = _monitor_accuracy(monitor_encoder, held)
        result.eval_accuracy.append(accuracy)
        result.eval_steps.append(step)
        result.eval_wall.append(train_time)
        if progress:  # a long run can be judged while it trains, not only from its record
            tqdm.write(f"{name}: step {step:,}, {train_time:.0f} s of training: held-out "
                       f"accuracy {100 * accuracy:.1f}% (no flip test)", file=sys.stderr)
        clock["eval"] += time.perf_counter() - t

    def on_step(info: StepInfo) -> bool:
        # Training time runs from the first sample read (the loop's one-off setup — building
        # the optimiser, writing config.json — is not training) when that is seen in this
        # process (num_workers = 0), else from the call to train().
        start = recorder.first_read if recorder.first_read is not None else clock["start"]
        train_time = (clock["before"] + time.perf_counter() - start - clock["eval"]
                      - clock["paused"])
        if info.step != result.steps + 1:  # the loop fell back past a damaged checkpoint
            raise ValueError(
                f"{name}: training resumed at step {info.step}, but {RECORD_FILE} continues "
                f"from step {result.steps} (its checkpoint could not be used); remove "
                f"{out_dir} to train this run again"
            )
        result.losses.append(info.loss)
        result.step_wall.append(train_time)
        result.steps = info.step
        if info.step % eval_every == 0:
            check(info.step, train_time)
        if checkpoint_path(out_dir, info.step).exists():  # the loop has just written it
            t = time.perf_counter()
            result.eval_seconds = initial_eval + clock["eval"]
            _write_record(record_path, result, fingerprint, recorder, finished=False)
            clock["paused"] += time.perf_counter() - t  # bookkeeping is not training
        if budget_seconds is not None and train_time >= budget_seconds:
            result.stopped_by = "time"
            return True  # the loop checkpoints this step: the weights scored are saved
        return False

    initial_eval = result.eval_seconds
    if resumed is None:
        _write_record(record_path, result, fingerprint, recorder, finished=False)
        check(0, 0.0)
        initial_eval, clock["eval"] = clock["eval"], 0.0  # before the clock starts
    clock["start"] = time.perf_counter()
    trained = train_run(config, resume=True, dataset=recorder, model=model, loss=loss,
                        on_step=on_step, progress=progress, averaged=averaged)
    result.checkpoint = trained.checkpoint
    result.wall_seconds = result.step_wall[-1] if result.step_wall else 0.0
    if held is not None and (not result.eval_steps or result.eval_steps[-1] != result.steps):
        check(result.steps, result.wall_seconds)
    result.eval_seconds = initial_eval + clock["eval"]
    batch = config.batch.effective_size
    result.images_per_second = result.steps * batch / max(result.wall_seconds, 1e-9)
    if config.data.num_workers == 0:
        result.data_order = f"{recorder.hexdigest()[:16]} ({recorder.count} reads)"
    scores = None
    if held is not None:
        t = time.perf_counter()
        sync_average()
        scores = _held_out_scores(final_encoder, held)
        result.final = _final_report(scores, held)
        result.eval_seconds += time.perf_counter() - t
    _write_record(record_path, result, fingerprint, recorder, finished=True, final_scores=scores)
    return result


def _reused(result: RunResult, record: dict[str, Any], held: _HeldOut | None) -> RunResult:
    """A finished run's result from its record (the final report recomputed from the stored
    scores: the same numbers)."""
    result.steps = int(record["step"])
    result.losses = [float(v) for v in record["losses"]]
    result.step_wall = [float(v) for v in record["step_wall"]]
    result.eval_steps = [int(v) for v in record["eval_steps"]]
    result.eval_wall = [float(v) for v in record["eval_wall"]]
    result.eval_accuracy = [float(v) for v in record["eval_accuracy"]]
    result.eval_seconds = float(record["eval_seconds"])
    result.stopped_by = str(record["stopped_by"])
    result.wall_seconds = float(record["wall_seconds"])
    result.images_per_second = float(record["images_per_second"])
    result.data_order = record["data_order"]
    result.checkpoint = None if record["checkpoint"] is None else Path(record["checkpoint"])
    if held is not None and record["final_scores"] is not None:
        result.final = _final_report(_unfloats(record["final_scores"]), held)
    return result


def recorded_run(run_dir: str | os.PathLike[str], name: str | None = None) -> RunResult:
    """A run's curves as its ``compare_run.json`` holds them (finished or not), for plotting
    runs of different ``compare`` invocations together; ``name`` defaults to the folder's.
    ``final`` stays ``None`` (the held-out pairs are not reloaded).

    Raises:
        FileNotFoundError: no ``compare_run.json`` in ``run_dir``.
        ValueError: a record that cannot be read or is of another version.
    """
    folder = Path(run_dir)
    record = _read_record(folder / RECORD_FILE)
    if record is None:
        raise FileNotFoundError(
            f"{folder / RECORD_FILE} missing: pass the folder of one run of a compare "
            f"(OUT/<config name>/), not the compare's own --out folder"
        )
    config = record["settings"].get("config", {})
    result = RunResult(
        name or folder.name, folder, folder, str(config.get("loss", {}).get("name", "?")),
        int(record["step"]), [float(v) for v in record["losses"]],
        [float(v) for v in record["step_wall"]],
        eval_steps=[int(v) for v in record["eval_steps"]],
        eval_wall=[float(v) for v in record["eval_wall"]],
        eval_accuracy=[float(v) for v in record["eval_accuracy"]],
        eval_seconds=float(record["eval_seconds"]),
    )
    if record["status"] == "finished":
        result.stopped_by = str(record["stopped_by"])
        result.wall_seconds = float(record["wall_seconds"])
        result.images_per_second = float(record["images_per_second"])
    return result


def smooth_losses(values: np.ndarray) -> np.ndarray:
    """A trailing running mean over 2% of the steps (at least 1)."""
    window = max(1, values.shape[0] // 50)
    if window == 1:
        return values
    padded = np.r_[np.full(window - 1, values[0]), values]
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def plot_convergence(runs: Sequence[RunResult], path: str | os.PathLike[str],
                     title: str = "Convergence") -> Path:
    """2×2 panels: training loss (running mean; log scale when every loss is positive) and
    held-out accuracy against steps and against training wall time, one line per run;
    written atomically as PNG."""
    fig = _new_figure(12.0, 8.5)
    axes = fig.subplots(2, 2)
    for run in runs:
        steps = np.arange(1, len(run.losses) + 1)
        loss = (smooth_losses(np.asarray(run.losses, dtype=np.float64)) if run.losses
                else np.array([]))
        label = f"{run.name} ({run.loss_name})"
        (line,) = axes[0, 0].plot(steps, loss, label=label)
        color = line.get_color()
        axes[0, 1].plot(run.step_wall, loss, color=color, label=label)
        if run.eval_steps:
            acc = 100.0 * np.asarray(run.eval_accuracy)
            axes[1, 0].plot(run.eval_steps, acc, "o-", color=color, ms=3, label=label)
            axes[1, 1].plot(run.eval_wall, acc, "o-", color=color, ms=3, label=label)
    all_losses = [v for r in runs for v in r.losses]
    return finish_convergence_panels(fig, axes, path, title, "training time (s)",
                                     log_loss=bool(all_losses) and min(all_losses) > 0)


def finish_convergence_panels(fig: Any, axes: Any, path: str | os.PathLike[str], title: str,
                              time_label: str, *, log_loss: bool) -> Path:
    """Label, grid and save the 2×2 convergence panels (loss / held-out accuracy against
    steps / ``time_label``); the loss axes on a log scale when ``log_loss`` (losses of
    different families differ in scale). Written atomically as PNG."""
    labels = (("step", "training loss (running mean)"), (time_label, "training loss"),
              ("step", "held-out accuracy (%)"), (time_label, "held-out accuracy (%)"))
    if log_loss:
        for ax in axes[0]:
            ax.set_yscale("log")
    for ax, (xlabel, ylabel) in zip(axes.flat, labels, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no held-out pairs given", ha="center", va="center",
                    transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path, title)


def _markdown(runs: Sequence[RunResult], header: list[str]) -> str:
    rows = []
    for r in runs:
        f = r.final
        rows.append([
            r.name, r.loss_name, str(r.steps), r.stopped_by,
            f"{r.final_loss:.4f}",
            "—" if f is None else _accuracy_text(f),
            "—" if f is None else f"{f.auc:.5f}",
            "—" if f is None else _pct(f.eer),
            "—" if f is None else _tar_text(f, _TABLE_FAR),
            f"{r.wall_seconds:.1f} s", f"{r.images_per_second:.1f}",
            r.data_order or "— (workers)",
        ])
    cols = ["run", "loss", "steps", "stopped by", "final loss", "accuracy", "AUC", "EER",
            "TAR@FAR=1e-3", "train time", "img/s", "data order"]
    lines = [*header, "", *_table(cols, rows)]
    finals = {r.name: r.final for r in runs if r.final is not None}
    if finals:
        lines += ["", "## All verification metrics", "", comparison_table(finals).rstrip()]
    lines += ["", "![convergence](convergence.png)"]
    return "\n".join(lines) + "\n"


def _metrics(runs: Sequence[RunResult], settings: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": settings, "runs": []}
    for r in runs:
        f = r.final
        out["runs"].append({
            "name": r.name, "config": r.config_path, "output_dir": r.output_dir,
            "loss": r.loss_name, "steps": r.steps, "stopped_by": r.stopped_by,
            "wall_seconds": r.wall_seconds, "eval_seconds": r.eval_seconds,
            "images_per_second": r.images_per_second, "final_loss": r.final_loss,
            "data_order": r.data_order, "checkpoint": r.checkpoint,
            "losses": r.losses, "step_wall": r.step_wall,
            "eval": {"steps": r.eval_steps, "wall": r.eval_wall, "accuracy": r.eval_accuracy},
            "final": None if f is None else {
                "accuracy": f.accuracy, "accuracy_std": f.accuracy_std, "auc": f.auc,
                "eer": f.eer, "tar_at_far": f.tar_at_far,
                "num_pairs": f.num_positives + f.num_negatives,
            },
        })
    return _json_safe(out, "metrics")


def compare(
    configs: Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str],
    budget_steps: int | None = None,
    budget_seconds: float | None = None,
    eval_every: int = 100,
    eval_pairs: str | os.PathLike[str] | None = None,
    eval_root: str | os.PathLike[str] | None = None,
    max_eval_pairs: int | None = None,
    eval_folds: int = 10,
    data_root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    checkpoint_every: int = 100,
    progress: bool = True,
) -> CompareResult:
    """Train every configuration under one budget and seed; plot and tabulate (module doc).

    Run again on the same ``out_dir`` after a kill, it reuses the finished runs and resumes
    the unfinished one from its last checkpoint (written every ``checkpoint_every`` steps;
    module docstring, "Resuming after a kill").

    Raises:
        ValueError: fewer than one config, no budget, configs on different data, a pair loss
            without P×K batches, eval pairs without their image root, bad numbers; a run's
            folder whose record was written with other settings.
        FileExistsError: a run's folder ``out_dir/<name>`` holds checkpoints but no compare
            record (another tool's run).
    """
    if not configs:
        raise ValueError("give at least one configuration")
    if budget_steps is None and budget_seconds is None:
        raise ValueError("give budget_steps and/or budget_seconds: the runs must share a budget")
    if budget_steps is not None and budget_steps < 1:
        raise ValueError(f"budget_steps must be >= 1, got {budget_steps}")
    if budget_seconds is not None and not budget_seconds > 0:
        raise ValueError(f"budget_seconds must be > 0, got {budget_seconds}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if (eval_pairs is None) != (eval_root is None):
        raise ValueError("eval_pairs and eval_root go together (pairs file + aligned images)")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    out = Path(out_dir)
    paths = [Path(c) for c in configs]
    names = _names(paths)
    loaded = [load_config(p) for p in paths]
    for name, cfg in zip(names, loaded, strict=True):
        cfg.seed = seed
        cfg.output_dir = out / name
        if data_root is not None:
            cfg.data.root = Path(data_root)
        if budget_steps is not None:
            cfg.train.max_steps = budget_steps
        cfg.train.checkpoint_every = checkpoint_every  # what a killed compare resumes from
        # the previous checkpoint must survive until the record of the newest is written
        cfg.train.keep_checkpoints = max(2, cfg.train.keep_checkpoints)
        pair = pair_loss_names([cfg.loss, *cfg.aux_loss])
        if cfg.batch.p is None and pair:
            raise ValueError(f"{name}: the pair loss {pair[0]!r} needs [batch] p and k")
    _check_same_data(loaded, names)

    first = loaded[0]
    dataset = build_dataset(first)
    if first.data.verify and hasattr(dataset, "verify"):
        failures = dataset.verify(workers=max(1, first.data.num_workers))
        if failures:
            logger.warning("dropped %d unreadable training image(s), e.g. %s", len(failures),
                           failures[0].path)
    for cfg in loaded:
        cfg.data.verify = False  # verified once above, for every run
    held = None
    if eval_pairs is not None and eval_root is not None:
        held = _load_held_out(Path(eval_pairs), Path(eval_root), eval_folds, max_eval_pairs)

    run_settings = {  # what else, beside each run's configuration, shapes its result
        "budget_seconds": budget_seconds, "eval_every": eval_every,
        "eval_pairs": None if eval_pairs is None else str(Path(eval_pairs).resolve()),
        "eval_root": None if eval_root is None else str(Path(eval_root).resolve()),
        "max_eval_pairs": max_eval_pairs, "eval_folds": eval_folds,
    }
    runs: list[RunResult] = []
    for name, path, cfg in zip(names, paths, loaded, strict=True):
        logger.info("compare: training %s (%s)", name, cfg.loss.name)
        runs.append(_run_one(name, path, cfg, dataset, held, budget_seconds=budget_seconds,
                             eval_every=eval_every, progress=progress, settings=run_settings))

    budget = " and ".join(
        b for b in (f"{budget_steps} steps" if budget_steps else "",
                    f"{budget_seconds:g} s of training" if budget_seconds else "") if b
    )
    held_text = "no held-out pairs" if held is None else (
        f"held-out pairs {eval_pairs} ({held.is_same.shape[0]} pairs, {held.failures} "
        f"unloadable images; {held.monitor.shape[0]} pairs checked every {eval_every} steps "
        "without flip test, final metrics on all with flip test)"
    )
    header = [
        "# Loss comparison", "",
        f"Budget {budget}, seed {seed}, data {first.data.root} ({len(dataset)} images, "
        f"{dataset.num_classes} identities); {held_text}. Train time excludes evaluation; "
        "final loss is the mean of the last 10% of steps; runs with equal data-order "
        "digests read the same samples in the same order.",
    ]
    text = _markdown(runs, header)
    plot = plot_convergence(runs, out / "convergence.png",
                            title=f"Convergence ({budget}, seed {seed})")
    settings = {
        "budget_steps": budget_steps, "budget_seconds": budget_seconds, "seed": seed,
        "eval_every": eval_every, "eval_pairs": eval_pairs, "eval_root": eval_root,
        "max_eval_pairs": max_eval_pairs, "data_root": first.data.root,
        "num_images": len(dataset), "num_identities": dataset.num_classes,
    }
    metrics_text = json.dumps(_metrics(runs, settings), indent=2, allow_nan=False)
    metrics_json = atomic_write_text(out / "metrics.json", metrics_text + "\n")
    table = atomic_write_text(out / "comparison.md", text)
    return CompareResult(tuple(runs), plot, table, metrics_json, text)


__all__ = [
    "CompareResult",
    "RunResult",
    "compare",
    "finish_convergence_panels",
    "plot_convergence",
    "recorded_run",
    "smooth_losses",
]
