"""The training loop: epochs of batches → backbone → loss → optimiser step, resumable.

``train(config)`` builds what the config names (dataset, backbone, loss, optimiser, schedule),
runs ``max_steps`` optimiser steps (or ``epochs`` epochs) and writes to ``output_dir``:

- ``checkpoint_<step>.pt`` every ``checkpoint_every`` steps and at the end (atomic, the
  newest ``keep_checkpoints`` kept; see :mod:`facemetric.training.checkpoint`);
- ``log.csv``: ``step, epoch, loss, lr, images_per_s, wall_s, loss_terms`` every
  ``log_every`` steps, and at the step where an ``on_step`` stop ends the run (``loss`` is
  the mean over the steps since the previous row;
  ``loss_terms``, for an objective of several parts — ``[[aux_loss]]``, ``[distill]`` — each
  part's unweighted mean over the same steps on this process, ``name=value; ...``, else
  empty);
- ``loss_curve.png`` at the end (per-step loss and its running mean);
- ``config.json``: the configuration the run used.

**Exact resume.** Everything that decides the next step is either in the checkpoint or a
pure function of it: model, loss (class centres), optimiser, schedule and grad-scaler
states; the position ``(epoch, batch index)``; the global torch/NumPy/Python RNG states; and
the data order, which is a function of ``(seed, epoch)`` only (``PKSampler`` or
:class:`ShuffledBatchSampler`). Each sample's augmentation draws from its own generator
seeded by ``(seed, epoch, batch, position)`` (:func:`facemetric.data.transforms.sample_seeds`),
so a run resumed with ``resume=True`` produces the same batches, losses and parameters as
one never interrupted (bitwise on CPU), whatever the number of DataLoader workers. Rows
of ``log.csv`` written after the checkpoint by the interrupted run are dropped on resume.
Stateful losses resume too: their buffers (center loss's centres, AdaCos's scale,
SphereFace's annealing counter) are part of the loss's state. With global hard mining the
DataLoader is restarted after every index refresh, so no batch drawn ahead by a worker
before the refresh is used after it (an interrupted and a resumed run draw every batch
from the same neighbour table). A damaged newest checkpoint (unreadable, or with NaN/Inf
weights) is skipped with a warning and the previous one used
(:func:`~facemetric.training.checkpoint.load_newest_checkpoint`).

**Never a broken model.** A NaN/Inf embedding or loss stops training with a
``FloatingPointError`` naming the step (and, with several processes, the ranks: every
process checks the others' values before it goes on, so all stop together instead of one
raising while the others wait in a collective). A NaN/Inf gradient behind a finite loss is
found before the optimiser step (from the gradient norm clipping computes, or computed for
the check): the step is skipped — no optimiser update (its forward pass has run, so
BatchNorm statistics and loss state saw the batch), counted as a step — with a warning, at
most ``[train] max_skipped_steps`` times in a run (the count is checkpointed), then
training stops with an error. A checkpoint is never written from non-finite weights. (Under fp16
AMP on CUDA the grad scaler skips overflowing steps itself; those are not counted.) A loss
that does not depend on the weights (no gradient: built from constants) stops the run
before ``backward()`` with a ``ValueError`` saying so, or the ``FloatingPointError`` above
when it is also NaN/Inf.

**Distributed.** Rank and world size live only in :class:`DistributedContext` (one process
by default): the samplers shard by it, and model wrapping, metric reduction and barriers go
through it. :func:`run_from_cli` under torchrun (``WORLD_SIZE > 1``) starts the process
group and uses :class:`facemetric.training.distributed.DDPContext`; with ``[partial_fc]
sample_rate`` the classifier loss becomes a Partial FC whose centres are sharded by rank, and
checkpoints gather the shards (see :mod:`facemetric.training.distributed`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from facemetric.data.folders import IdentityFolder, LoadFailure
from facemetric.data.samplers import PKSampler
from facemetric.data.transforms import (
    Compose,
    Resize,
    ToTensor,
    sample_seeds,
    train_transform,
)
from facemetric.training.builders import (
    add_aux_losses,
    build_loss,
    build_model,
    build_optimizer,
    build_partial_fc,
    build_scheduler,
    class_counts_of,
    is_classifier_loss,
    pair_loss_names,
)
from facemetric.training.checkpoint import (
    atomic_write,
    capture_rng_state,
    list_checkpoints,
    load_newest_checkpoint,
    non_finite_tensors,
    restore_rng_state,
    save_checkpoint,
)
from facemetric.training.config import TrainConfig, check_config, load_config
from facemetric.training.ema import WeightAverage
from facemetric.training.malloc import retain_freed_memory
from facemetric.training.row_sparse_sgd import clip_grad_norm
from facemetric.training.structure import build_structure

logger = logging.getLogger(__name__)

LOG_FIELDS = ("step", "epoch", "loss", "lr", "images_per_s", "wall_s", "loss_terms")
#: [train] keys that may change between a run and its resumption without a warning
_RESUME_FREE_KEYS = {
    "train.epochs", "train.max_steps", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.device", "data.num_workers", "output_dir",
    "train.max_skipped_steps", "train.compile", "distill.workers", "distill.chunk",
}


# --------------------------------------------------------------------------- distribution


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly) multi-process run.

    The default is a single process. A DDP implementation subclasses this and overrides
    :meth:`wrap_model`, :meth:`unwrap_model`, :meth:`reduce_mean` and :meth:`barrier`; the loop
    calls nothing else distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad rank {self.rank} for world_size {self.world_size}")

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, checkpoints and plots."""
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """``cpu``, ``cuda`` (this process's GPU) or ``auto`` (CUDA if available)."""
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("[train] device = 'cuda' but CUDA is not available")
            return torch.device("cuda", self.local_rank)
        return torch.device(requested)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the loop calls (DDP would wrap here)."""
        return model

    def wrap_loss(self, loss: nn.Module) -> nn.Module:
        """The loss module the loop calls (DDP would wrap its non-sharded parameters)."""
        return loss

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        """The plain module whose ``state_dict`` is checkpointed."""
        return getattr(model, "module", model) if self.world_size > 1 else model

    def reduce_mean(self, value: float) -> float:
        """Mean of ``value`` over the processes (for logging)."""
        return value

    def all_values(self, value: float) -> list[float]:
        """``value`` of every process, in rank order (a collective under DDP: every process
        calls it). The loop uses it to agree on failures before anyone raises."""
        return [float(value)]

    def barrier(self) -> None:
        """Wait for every process."""


# --------------------------------------------------------------------------- data


class ShuffledBatchSampler(Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` indices; the last partial batch is dropped.

    The order depends only on ``(seed, epoch)`` (call :meth:`set_epoch`); with several
    processes each takes every ``num_replicas``-th batch starting at ``rank``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_samples < batch_size * num_replicas:
            raise ValueError(
                f"{num_samples} samples cannot fill one batch of {batch_size} per process "
                f"({num_replicas} processes); lower [batch] size"
            )
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples // self.batch_size // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        state = np.random.SeedSequence([self.seed, 0xBA7C, self.epoch]).generate_state(2)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        order = torch.randperm(self.num_samples, generator=gen).tolist()
        for b in range(len(self)):
            start = (b * self.num_replicas + self.rank) * self.batch_size
            yield order[start : start + self.batch_size]


class _SeededBatches(Sampler[list[tuple[int, int]]]):
    """One epoch of ``sampler`` from batch ``skip`` on, each index paired with its
    augmentation seed ``sample_seeds(seed, epoch, g, ·)``, where ``g = batch·R + rank`` is
    the batch's number over all ``R`` processes (the sampler's ``num_replicas``/``rank``):
    processes draw different augmentations, and one process (``R = 1``) numbers ``g = batch``."""

    def __init__(self, sampler: Any, seed: int, epoch: int, skip: int) -> None:
        super().__init__()
        self.sampler, self.seed, self.epoch, self.skip = sampler, seed, epoch, skip

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b, batch in enumerate(self.sampler):
            if b < self.skip:
                continue
            replicas = int(getattr(self.sampler, "num_replicas", 1))
            number = b * replicas + int(getattr(self.sampler, "rank", 0))
            seeds = sample_seeds(self.seed, self.epoch, number, len(batch))
            yield list(zip(batch, seeds, strict=True))


class AugmentedDataset(Dataset):
    """``base[index]`` augmented with a generator seeded per sample.

    Items are requested as ``(index, seed)``. An image the base returns as an ``(H, W, 3)``
    uint8 array goes through ``transform(image, numpy.random.default_rng(seed))``; an image
    returned as a tensor is used as it is (already preprocessed). Fields after the label
    (a distillation teacher's embedding) are passed on unchanged, and the loop hands them
    to the loss after the labels.
    """

    def __init__(self, base: Dataset, transform: Compose) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        index, seed = key
        image, label, *extra = self.base[index]  # extra: e.g. the teacher's embedding
        if isinstance(image, np.ndarray):
            image = self.transform(image, np.random.default_rng(seed))
        return (image, int(label), *extra)


def keep_array(image: np.ndarray) -> np.ndarray:
    """The identity: ``IdentityFolder(transform=keep_array)`` yields the uint8 arrays."""
    return image


def build_dataset(config: TrainConfig) -> Dataset:
    """``[data] root`` yielding raw uint8 arrays (augmented later): an ``IdentityFolder``
    over a folder tree, or a :class:`~facemetric.data.recordio.RecordDataset` over an
    insightface ``.rec`` file (whose labels are used as they are)."""
    d = config.data
    if Path(d.root).suffix == ".rec":
        if d.people_file is not None or d.folds is not None or d.min_images > 1:
            raise ValueError(f"[data] root {d.root} is a RecordIO file: people_file, folds and "
                             "min_images select identities of a folder tree and do not apply")
        from facemetric.data.recordio import RecordDataset

        return RecordDataset(d.root)
    return IdentityFolder(
        d.root, people_file=d.people_file, folds=d.folds, min_images=d.min_images,
        transform=keep_array,
    )


def _hard_identity_batches(
    config: TrainConfig, labels: np.ndarray, dataset: Dataset, ctx: DistributedContext,
    device: torch.device,
) -> tuple[Any, Any]:
    """``[mining] global_index``: a ``HardIdentitySampler`` and the ``IndexRefresher`` that
    re-embeds ``dataset`` every ``refresh_every`` steps (see
    :mod:`facemetric.miners.global_index`)."""
    from facemetric.data.transforms import eval_transform
    from facemetric.miners.global_index import (
        EmbeddingIndex,
        HardIdentitySampler,
        IndexRefresher,
    )

    m, b = config.mining, config.batch
    assert b.p is not None and b.k is not None
    sampler = HardIdentitySampler(labels, b.p, b.k, neighbours=m.neighbours,
                                  min_images=b.min_images, seed=config.seed,
                                  num_replicas=ctx.world_size, rank=ctx.rank)
    index = EmbeddingIndex(per_image=m.per_image, backend=m.backend,
                           approximate_above=m.approximate_above, approximate=m.approximate)
    refresher = IndexRefresher(index, sampler, dataset, every=m.refresh_every,
                               batch_size=m.batch_size, device=device,
                               transform=eval_transform(config.data.image_size),
                               num_workers=config.data.num_workers)
    return sampler, refresher


def _dataset_labels(dataset: Dataset) -> np.ndarray:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        logger.info("dataset has no .targets; reading every item once for its label")
        targets = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    return np.asarray(targets, dtype=np.int64)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StepInfo:
    """What :func:`train` passes to ``on_step`` after each optimiser step."""

    step: int
    epoch: int
    batch_in_epoch: int
    loss: float
    lr: float


@dataclass
class TrainResult:
    """What a run produced.

    ``losses[i]`` is the loss of step ``i + 1`` over the whole run, steps before a resume
    included (read back from the checkpoint). ``images_per_second`` and ``wall_seconds``
    are for this call only.
    """

    steps: int
    epochs: int
    losses: list[float]
    output_dir: Path
    checkpoint: Path | None
    log_csv: Path
    loss_plot: Path | None
    model: nn.Module
    loss: nn.Module
    failures: list[LoadFailure] = field(default_factory=list)
    images_per_second: float = 0.0
    wall_seconds: float = 0.0
    resumed_from: int | None = None
    averaged: WeightAverage | None = None
    """The average of the weights (``[train] ema_decay``), which the checkpoints store as
    ``"model"``; ``model`` holds the optimiser's raw weights."""


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed the global torch (CPU and CUDA), NumPy and Python generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def gradient_norm(params: Sequence[Tensor]) -> Tensor:
    """The global L2 norm (float64) of the gradients of ``params`` — a sparse gradient
    counts its stored values — or 0 when none has a gradient. It is NaN or infinite when a
    gradient holds a NaN or an infinity (or values so large their squares overflow)."""
    norms = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        values = g._values() if g.is_sparse else g
        norms.append(torch.linalg.vector_norm(values).to(torch.float64))
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def _failing_ranks(ctx: DistributedContext, failed: bool) -> list[int]:
    """The ranks on which ``failed`` holds (a collective with several processes)."""
    if ctx.world_size == 1:
        return [0] if failed else []
    return [r for r, v in enumerate(ctx.all_values(1.0 if failed else 0.0)) if v != 0.0]


def _check_embeddings(bad: Sequence[int], step: int, ctx: DistributedContext) -> None:
    """Raise the loop's error for embeddings that hold NaN or Inf on the ranks ``bad``
    (``step`` is the number of steps done before this one)."""
    if bad:
        raise FloatingPointError(
            f"the embeddings hold NaN or Inf at step {step + 1}{_where(bad, ctx)}; "
            "lower [optimizer] lr or set [train] grad_clip"
        )


def _non_finite_loss(number: float, step: int, where: str) -> FloatingPointError:
    """The loop's error for a NaN/Inf loss ``number`` (``step`` steps done; ``where``: the
    ranks, from :func:`_where`)."""
    return FloatingPointError(f"the loss is {number} at step {step + 1}{where}; lower "
                              "[optimizer] lr or set [train] grad_clip")


def _no_gradient(value: Tensor, step: int) -> NoReturn:
    """Raise for a loss ``value`` that does not depend on the weights (``step`` steps done):
    the loop's ``FloatingPointError`` when it is NaN or Inf, as for any other non-finite
    loss, else a ``ValueError`` naming the cause instead of torch's backward error."""
    number = float(value.detach().float().reshape(-1)[0]) if value.numel() else math.nan
    if not math.isfinite(number):
        raise _non_finite_loss(number, step, "")
    raise ValueError(
        f"the loss at step {step + 1} ({number:g}) does not depend on the model's weights "
        "(no gradient): the loss must be computed from the embeddings it is given — a loss "
        "with nothing to compare in a batch should return e.g. embeddings.sum() * 0"
    )


def _read_once(first: Tensor, rest: Sequence[Tensor | float]) -> list[float]:
    """One-element tensors (or plain numbers: a third-party loss's ``last`` may hold floats)
    as Python floats, in one transfer from ``first``'s device (booleans as 1.0 / 0.0): on a
    GPU every read waits for all queued kernels, so a step reads once."""
    stacked = torch.stack([torch.as_tensor(v).to(device=first.device,
                                                 dtype=torch.float64).reshape(())
                           for v in (first, *rest)])
    return stacked.tolist()


def _where(ranks: Sequence[int], ctx: DistributedContext) -> str:
    if ctx.world_size == 1:
        return ""
    return (f" on rank {', '.join(map(str, ranks))} of {ctx.world_size} (every rank stops "
            "here)")


def _autocast(config: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    t = config.train
    dtype = torch.bfloat16 if t.amp_dtype == "bf16" else torch.float16
    if not t.amp:
        return False, dtype
    if device.type == "cuda":
        return True, dtype
    if device.type == "cpu" and dtype == torch.bfloat16:
        return True, dtype
    logger.warning("amp with %s is not supported on %s; training in float32", t.amp_dtype,
                   device.type)
    return False, dtype


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("params", "miner_params", "options"):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any]) -> None:
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in
        _RESUME_FREE_KEYS
    )
    if changed:
        logger.warning(
            "resuming with a configuration that differs from the checkpoint's in %s; the run "
            "will not match an uninterrupted one", changed,
        )


class _CsvLog:
    """``log.csv`` rows; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        kept: list[list[str]] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as handle:
                rows = list(csv.reader(handle))
            kept = [r for r in rows[1:] if r and int(r[0]) <= resume_step]
        #: the step of the newest row (0: none); the next row starts after it
        self.last_step = max((int(r[0]) for r in kept), default=0)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(LOG_FIELDS)
        writer.writerows(kept)
        atomic_write(path, lambda f: f.write(text.getvalue().encode()))

    def write(self, row: Sequence[Any]) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerow(row)
        self.last_step = int(row[0])


def plot_loss_curve(losses: Sequence[float], path: Path, title: str = "training loss") -> Path:
    """Per-step loss (light) and its running mean over ~1% of the run, saved atomically as
    a PNG (matplotlib's Agg canvas; pyplot's global state is not touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(1, len(losses) + 1)
    values = np.asarray(losses, dtype=np.float64)
    ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
    window = max(1, len(values) // 100)
    if window > 1:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


# --------------------------------------------------------------------------- the loop


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    dataset: Dataset | None = None,
    model: nn.Module | None = None,
    loss: nn.Module | None = None,
    context: DistributedContext | None = None,
    on_step: Callable[[StepInfo], bool | None] | None = None,
    progress: bool = True,
    averaged: WeightAverage | None = None,
) -> TrainResult:
    """Train as ``config`` says; see the module docstring for what is written and how
    resuming works.

    Args:
        config: the experiment (``load_config``).
        resume: continue from the newest checkpoint in ``output_dir`` (a fresh start if there
            is none). Without it, an ``output_dir`` that holds checkpoints is refused.
        dataset: items ``(image, label)`` — an ``(H, W, 3)`` uint8 array (augmented with
            ``[augment]`` and normalised) or a ready tensor; labels ``0 .. C−1``; a
            ``targets`` attribute saves a pass over it. Default: ``IdentityFolder`` over
            ``[data] root``. If it has ``verify()`` and ``[data] verify`` is true, broken
            images are found and dropped before training (see ``TrainResult.failures``).
        model: the backbone (default: ``[model]`` from the registry); it must map a batch
            to ``(B, [model] embedding_size)``.
        loss: the loss module (default: built from ``[loss]``, wrapped with the teacher's
            terms when ``[distill]`` names a teacher); called ``loss(emb, labels, *extra)``
            where ``extra`` are the dataset items' fields after the label (none, or the
            teacher's embedding).
        context: rank/world size (default: one process).
        on_step: called after every step (after that step's checkpoint, if one is due).
            Returning ``True`` (that bool: anything else returned is ignored, so a hook that
            happens to return a value does not stop a run) ends it there as at its last
            step — a checkpoint of that step is written (the weights a caller evaluates are
            the ones saved) and the result is returned; with several processes every one must
            return the same. An exception raised there stops training as a crash would (no
            final checkpoint, plot or result).
        progress: show a tqdm bar (loss, img/s, ETA).
        averaged: with ``[train] ema_decay``, the :class:`WeightAverage` of ``model`` to
            update (so that a caller can evaluate it while the run goes on); default: one
            made here. Resuming loads the checkpoint's average into it.

    Raises:
        FileExistsError: ``output_dir`` has checkpoints and ``resume`` is false.
        FloatingPointError: the embeddings or the loss became NaN or infinite (on any
            process), the gradient did more than ``[train] max_skipped_steps`` times, or the
            weights to checkpoint are not finite (nothing is written then).
        CheckpointError: (a ``ValueError``) resuming, and no checkpoint of ``output_dir``
            can be used (each damaged or holding non-finite weights).
        ValueError: an inconsistent configuration (e.g. a pair loss without P×K batches).
    """
    ctx = context or DistributedContext()
    out_dir = Path(config.output_dir)
    device = ctx.device(config.train.device)
    retain_freed_memory()  # activations re-used from the heap, not re-mapped every step
    if device.type == "cuda":  # process-wide, as the malloc setting above
        torch.backends.cudnn.benchmark = config.train.cudnn_benchmark
    started = time.perf_counter()

    existing = list_checkpoints(out_dir)
    if existing and not resume:
        raise FileExistsError(
            f"{out_dir} already holds {len(existing)} checkpoint(s); pass resume=True "
            "(--resume) to continue, or choose another output_dir"
        )
    seed_everything(config.seed)

    # ---- data
    if dataset is None:
        dataset = build_dataset(config)
    failures: list[LoadFailure] = []
    if config.data.verify and hasattr(dataset, "verify"):
        failures.extend(dataset.verify(workers=max(1, config.data.num_workers)))
        if failures:
            logger.warning("dropped %d unreadable image(s) before training, e.g. %s",
                           len(failures), failures[0].path)
    if config.distill.enabled:  # after verify: the teacher rows follow the kept samples
        from facemetric.training.distill import attach_teacher

        dataset = attach_teacher(config, dataset, progress=progress and ctx.is_main)
    labels = _dataset_labels(dataset)
    if labels.size == 0:
        raise ValueError("the dataset is empty")
    num_classes = int(getattr(dataset, "num_classes", int(labels.max()) + 1))
    classifier = loss is None and is_classifier_loss(config.loss)
    pair_terms = pair_loss_names([config.loss, *config.aux_loss])
    b = config.batch
    sampler: Any
    refresher: Any = None  # global hard-negative mining ([mining] global_index)
    # the hierarchical triplet's class tree / the magnet clusters ([class_tree], [magnet]):
    # one object is the batch sampler and the refresher (facemetric.training.structure)
    structure = build_structure(config, labels, dataset, num_replicas=ctx.world_size,
                                rank=ctx.rank, device=device)
    if b.p is not None and b.k is not None and config.mining.global_index:
        sampler, refresher = _hard_identity_batches(config, labels, dataset, ctx, device)
    elif structure is not None:
        sampler = refresher = structure
    elif b.p is not None and b.k is not None:
        sampler = PKSampler(labels, b.p, b.k, min_images=b.min_images, seed=config.seed,
                            num_replicas=ctx.world_size, rank=ctx.rank)
    elif loss is None and pair_terms:
        raise ValueError(
            f"the pair loss {pair_terms[0]!r} needs P×K batches: set [batch] p and k"
        )
    else:
        sampler = ShuffledBatchSampler(len(labels), b.size, seed=config.seed,
                                       num_replicas=ctx.world_size, rank=ctx.rank)
    steps_per_epoch = len(sampler)
    batch_images = b.effective_size * ctx.world_size
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
    a = config.augment
    transform = train_transform(
        config.data.image_size, flip=a.flip, crop_scale=a.crop_scale, crop_ratio=a.crop_ratio,
        padding=a.padding, brightness=a.brightness, contrast=a.contrast,
        saturation=a.saturation, blur_prob=a.blur_prob, grayscale_prob=a.grayscale_prob,
        blur_sigma=a.blur_sigma, occlusion_prob=a.occlusion_prob,
        occlusion_area=a.occlusion_area, downscale_prob=a.downscale_prob,
        downscale_scale=a.downscale_scale, jpeg_prob=a.jpeg_prob,
        jpeg_quality=[int(q) for q in a.jpeg_quality], pose_prob=a.pose_prob,
        pose_yaw=a.pose_yaw, pose_roll=a.pose_roll, pose_scale=a.pose_scale,
        pose_shift=a.pose_shift,
    )
    if b.p is not None and b.min_images == 1 and all(
        isinstance(op, (Resize, ToTensor)) for op in transform.ops
    ):
        raise ValueError(
            "[batch] min_images = 1 fills a single-image identity's k slots with copies of its "
            "one image, and without augmentation those positives are identical: enable an "
            "[augment] transform (flip, crop_scale, padding, colour ...) or set min_images >= 2"
        )
    data = AugmentedDataset(
        dataset if structure is None else structure.training_dataset(dataset), transform
    )

    # ---- model, loss, optimiser
    if model is None:
        model = build_model(config.model)
    if loss is None:
        counts = class_counts_of(labels, num_classes)
        loss = build_loss(config.loss, num_classes, config.model.embedding_size, counts)
        if config.partial_fc.sample_rate is not None:
            if not classifier:
                raise ValueError(
                    f"[partial_fc] needs a classifier loss, not {config.loss.name!r}"
                )
            sparse = config.partial_fc.sparse_update
            if sparse is None:
                sparse = config.optimizer.name == "sgd"
            loss = build_partial_fc(loss, config.partial_fc.sample_rate, rank=ctx.rank,
                                    world_size=ctx.world_size, seed=config.seed,
                                    sparse_grad=sparse)
        loss = add_aux_losses(loss, config.aux_loss, num_classes, config.model.embedding_size,
                              counts)
        if config.distill.enabled:
            from facemetric.training.distill import build_objective

            loss = build_objective(config.distill, loss, config.model.embedding_size,
                                   int(dataset.rows.shape[1]))  # type: ignore[attr-defined]
    if structure is not None:
        loss = structure.attach(loss)
    model.to(device)
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)  # a no-op for parameters that are not 4-d
    loss.to(device)
    if averaged is not None and config.train.ema_decay == 0:
        raise ValueError("an average of the weights was passed, but [train] ema_decay is 0: "
                         "set it to the decay the average was made with")
    if config.train.ema_decay > 0:
        if averaged is None:
            averaged = WeightAverage(model, config.train.ema_decay)
        averaged.to(device)
    optimizer = build_optimizer(config.optimizer, [model, loss])
    scheduler = build_scheduler(optimizer, config.schedule, total_steps)
    use_amp, amp_dtype = _autocast(config, device)
    scaler = torch.amp.GradScaler(
        "cuda", enabled=use_amp and device.type == "cuda" and amp_dtype == torch.float16
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    net = ctx.wrap_model(model)
    if config.train.compile:
        net = torch.compile(net)  # compiles at the first step; ``model`` stays the plain module
    loss_fn = ctx.wrap_loss(loss)

    # ---- resume
    step = epoch = batch_in_epoch = 0
    history: list[float] = []
    elapsed_before = 0.0
    resumed_from: int | None = None
    skipped = 0  # steps skipped for a non-finite gradient, over the whole run
    loaded = load_newest_checkpoint(out_dir, map_location="cpu") if resume else None
    ckpt_path = None if loaded is None else loaded[0]
    if loaded is not None:
        ckpt_path, state = loaded
        _warn_config_changes(state["config"], config.to_dict())
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"{ckpt_path} was written with {state['steps_per_epoch']} batches per epoch, "
                f"the data and batch settings now give {steps_per_epoch}: cannot resume"
            )
        raw = state.get("model_raw")  # present when the run keeps an average of the weights
        model.load_state_dict(state["model"] if raw is None else raw)
        if averaged is not None:
            if raw is None:
                logger.warning("%s holds no average of the weights: the average ([train] "
                               "ema_decay) starts from the resumed weights", ckpt_path)
            averaged.load(state["model"], int(state.get("ema_updates", 0)) if raw is not None
                          else 0)
        elif raw is not None:
            logger.warning("%s holds an average of the weights, this run keeps none ([train] "
                           "ema_decay = 0): training continues from the raw weights; the "
                           "checkpoints from now on hold the raw weights", ckpt_path)
        loss.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        if ctx.world_size > 1:
            from facemetric.training.distributed import shard_loaded_state

            shard_loaded_state(loss, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        scheduler.lr_lambdas[0].total = total_steps  # the config decides the run's length
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        if refresher is not None and "hard_sampler" in state:
            sampler.load_state_dict(state["hard_sampler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        history = state["losses"].tolist()
        skipped = int(state.get("skipped_steps", 0))
        elapsed_before = float(state["elapsed"])
        resumed_from = step
        logger.info("resumed from %s (step %d, epoch %d, batch %d)", ckpt_path, step, epoch,
                    batch_in_epoch)
    elif resume:
        logger.info("no checkpoint in %s; starting from scratch", out_dir)

    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config.to_dict(), indent=2)
        atomic_write(out_dir / "config.json", lambda f: f.write(text.encode()))
    log = _CsvLog(out_dir / "log.csv", resumed_from) if ctx.is_main else None

    def make_state(loss_state: dict[str, Any], optim_state: dict[str, Any]) -> dict[str, Any]:
        weights = ctx.unwrap_model(model).state_dict()
        # with an average, "model" (what every consumer loads) is the average
        average: dict[str, Any] = {} if averaged is None else {
            "model_raw": weights, "ema_updates": averaged.updates}
        return {
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "model": weights if averaged is None else averaged.state_dict(), **average,
            "loss": loss_state,
            "optimizer": optim_state, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "sampler": {"seed": config.seed, "epoch": epoch, "batch_in_epoch": batch_in_epoch},
            **({"hard_sampler": sampler.state_dict()} if refresher is not None else {}),
            "rng": capture_rng_state(),
            "losses": torch.tensor(history, dtype=torch.float64),
            "skipped_steps": skipped,
            "elapsed": elapsed_before + time.perf_counter() - started,
            "config": config.to_dict(),
        }

    if structure is not None and not structure.ready:  # built before the first batch
        structure.refresh(ctx.unwrap_model(model), step)
    last_ckpt: Path | None = ckpt_path
    saved_step = step if ckpt_path is not None else -1  # the step last_ckpt holds

    def write_checkpoint() -> None:
        nonlocal last_ckpt, saved_step
        if ctx.world_size > 1:  # a collective: sharded centres are gathered
            from facemetric.training.distributed import gather_sharded_state

            loss_state, optim_state = gather_sharded_state(loss, optimizer)
        else:
            loss_state, optim_state = loss.state_dict(), optimizer.state_dict()
        broken = non_finite_tensors(
            {"model": ctx.unwrap_model(model).state_dict(), "loss": loss_state}
        )
        if _failing_ranks(ctx, bool(broken)):
            raise FloatingPointError(
                f"the weights are not finite after step {step} "
                f"({', '.join(broken[:5])}); no checkpoint written — the last "
                f"one, {last_ckpt}, is intact: resume from it with a lower "
                "[optimizer] lr or [train] grad_clip"
            )
        if ctx.is_main:
            last_ckpt = save_checkpoint(make_state(loss_state, optim_state),
                                        out_dir, step, config.train.keep_checkpoints)
        saved_step = step
        ctx.barrier()

    stopped_early = False
    loader_gen = torch.Generator()  # keeps the DataLoader off the global RNG
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (progress and ctx.is_main), desc="train")
    window_start = time.perf_counter()
    window_steps = 0
    window_terms: dict[str, list[float]] = {}  # the objective's parts (its ``last``), per step
    run_images = 0
    step_epoch, lr = epoch, 0.0

    def log_row() -> None:
        """A ``log.csv`` row for the steps since the previous row: after the last multiple
        of ``log_every`` before this step, or after an earlier stop's off-grid row (a run
        resumed from a caller's stop starts its first row after that stop's)."""
        nonlocal window_start, window_steps, window_terms
        now = time.perf_counter()
        rate = window_steps * batch_images / max(now - window_start, 1e-9)
        first = (step - 1) // config.train.log_every * config.train.log_every
        if log is not None:
            first = max(first, log.last_step)
        mean = float(np.mean(history[first:step]))
        bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
        if log is not None:
            wall = elapsed_before + now - started
            terms = "; ".join(f"{k}={np.mean(v):.6g}" for k, v in window_terms.items())
            log.write([step, step_epoch, f"{mean:.6g}", f"{lr:.6g}", f"{rate:.1f}",
                       f"{wall:.2f}", terms])
        window_start, window_steps, window_terms = now, 0, {}

    try:
        while step < total_steps and not stopped_early:
            sampler.set_epoch(epoch)
            loader = DataLoader(
                data,
                batch_sampler=_SeededBatches(sampler, config.seed, epoch, batch_in_epoch),
                num_workers=config.data.num_workers,
                pin_memory=device.type == "cuda",
                generator=loader_gen,
            )
            for images, targets, *extra in loader:
                net.train()
                loss.train()
                images = images.to(device, non_blocking=True)
                if images.dim() == 4:
                    images = images.contiguous(memory_format=memory_format)
                targets = targets.to(device, non_blocking=True)
                extra = [x.to(device, non_blocking=True) for x in extra]
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    embeddings = net(images)
                finite = torch.isfinite(embeddings).all()
                if ctx.world_size > 1:
                    # Every process learns whether any other failed before the loss: one
                    # whose loss raised alone would leave the others blocked in the gradient
                    # all-reduce.
                    _check_embeddings(_failing_ranks(ctx, not bool(finite)), step, ctx)
                try:
                    value = loss_fn(embeddings.float(), targets, *extra)
                except Exception:  # a loss that checks its input: name the cause, the NaN
                    _check_embeddings([] if bool(finite) else [ctx.rank], step, ctx)
                    raise
                if not value.requires_grad:  # backward() would fail with torch's words
                    _no_gradient(value, step)
                # The loss is read after its backward pass, not before: on a GPU a read waits
                # for every queued kernel, and here it is one transfer with the checks.
                scaler.scale(value).backward()
                norm: Tensor | None = None
                if config.train.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    norm = clip_grad_norm(params, config.train.grad_clip)
                check_norm = not scaler.is_enabled()  # an fp16 grad scaler skips overflows
                if check_norm and norm is None:
                    norm = gradient_norm(params)
                terms = getattr(loss, "last", {})
                host = _read_once(finite, [value.detach(), *([norm] if check_norm else []),
                                           *terms.values()])
                if ctx.world_size == 1:
                    _check_embeddings([] if host[0] else [0], step, ctx)
                values = ctx.all_values(host[1])
                bad = [r for r, v in enumerate(values) if not math.isfinite(v)]
                if bad:
                    raise _non_finite_loss(values[bad[0]], step, _where(bad, ctx))
                lr = float(optimizer.param_groups[0]["lr"])
                skip: list[int] = []
                if check_norm:
                    norm_value = host[2]
                    skip = _failing_ranks(ctx, not math.isfinite(norm_value))
                if skip:
                    skipped += 1
                    what = (f"the gradient is not finite (norm {norm_value:g}) at step "
                            f"{step + 1}{_where(skip, ctx)} behind a finite loss")
                    if skipped > config.train.max_skipped_steps:
                        raise FloatingPointError(
                            f"{what}: {skipped} such steps, more than [train] "
                            f"max_skipped_steps = {config.train.max_skipped_steps}; lower "
                            "[optimizer] lr, set [train] grad_clip or check the data"
                        )
                    logger.warning("%s: step skipped (no update; %d of at most %d)", what,
                                   skipped, config.train.max_skipped_steps)
                else:
                    scaler.step(optimizer)
                    if averaged is not None:
                        averaged.update(model)
                scaler.update()
                scheduler.step()

                step += 1
                step_epoch = epoch
                batch_in_epoch += 1
                if batch_in_epoch == steps_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                history.append(sum(values) / len(values))
                for part, part_value in zip(terms, host[len(host) - len(terms):], strict=True):
                    window_terms.setdefault(part, []).append(part_value)
                window_steps += 1
                run_images += batch_images
                bar.update(1)
                restart = False
                if refresher is not None and refresher.due(step):  # kept out of img/s
                    window_start += refresher.refresh(ctx.unwrap_model(model), step)
                    restart = True  # batches the workers drew ahead used the old table
                if step % config.train.log_every == 0 or step == total_steps:
                    log_row()
                if step % config.train.checkpoint_every == 0 or step == total_steps:
                    write_checkpoint()
                if on_step is not None and on_step(
                    StepInfo(step, step_epoch, batch_in_epoch, history[-1], lr)
                ) is True:
                    stopped_early = True  # the caller's budget: end here as at the last step
                    if log is not None and log.last_step != step:  # a row for the stop
                        log_row()
                    if saved_step != step:
                        write_checkpoint()
                if step >= total_steps or restart or stopped_early:
                    break  # a restart: the next loader starts at batch_in_epoch
    finally:
        bar.close()

    wall = time.perf_counter() - started
    plot: Path | None = None
    if ctx.is_main and history:
        try:
            plot = plot_loss_curve(history, out_dir / "loss_curve.png",
                                   f"{config.loss.name} · {config.model.name}")
        except ImportError:
            logger.warning("matplotlib is not installed; no loss curve written")
    for failure in getattr(dataset, "failures", []):
        if failure not in failures:
            failures.append(failure)
    return TrainResult(
        steps=step,
        epochs=epoch,
        losses=history,
        output_dir=out_dir,
        checkpoint=last_ckpt,
        log_csv=out_dir / "log.csv",
        loss_plot=plot,
        model=model,
        loss=loss,
        failures=failures,
        images_per_second=run_images / max(wall, 1e-9),
        wall_seconds=wall,
        resumed_from=resumed_from,
        averaged=averaged,
    )


def run_from_cli(
    config_path: Path, resume: bool = False, teacher: str | None = None
) -> TrainResult:
    """``facemetric train --config CONFIG.toml [--resume]``: load the config and train.

    ``teacher`` (``facemetric distill --teacher dlib``) sets ``[distill] teacher``: the run
    distils that encoder into the configured student (``docs/distillation.md``).

    Launched by torchrun (``WORLD_SIZE > 1``) it starts the process group first
    (:func:`facemetric.training.distributed.init_distributed`), trains with DDP and ends the
    group afterwards.
    """
    config = load_config(config_path)
    if teacher is not None:
        config.distill.teacher = teacher
        check_config(config, str(config_path))
    from facemetric.training.distributed import DDPContext, init_distributed

    ctx = init_distributed()
    try:
        return train(config, resume=resume, context=ctx)
    finally:
        if isinstance(ctx, DDPContext):
            ctx.destroy()


__all__ = [
    "AugmentedDataset",
    "DistributedContext",
    "ShuffledBatchSampler",
    "StepInfo",
    "TrainResult",
    "build_dataset",
    "keep_array",
    "plot_loss_curve",
    "run_from_cli",
    "seed_everything",
    "train",
]
