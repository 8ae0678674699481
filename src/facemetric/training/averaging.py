"""The uniform average of a run's checkpoints (stochastic weight averaging over its tail).

Given the checkpoints ``θ_{s_1}, …, θ_{s_n}`` that one run wrote at steps ``s_1 < … < s_n``::

    θ̄ = (1/n) · Σ_i θ_{s_i}

for every floating-point tensor of the backbone (parameters and BatchNorm's running
statistics), summed in float64 and stored in the tensor's own dtype; integer buffers
(``num_batches_tracked``) are taken from the last checkpoint. This is stochastic weight
averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018) applied after the fact to the checkpoints a run keeps anyway, the
checkpoint averaging of the Kaggle metric-learning solutions. Where the run kept an EMA
(``[train] ema_decay``), each checkpoint's ``"model"`` already is that average over the last
~``1/(1 − decay)`` steps: the uniform average over a longer tail widens the window.

BatchNorm's running statistics are averaged like the weights, as the EMA does. SWA proper
recomputes them for the averaged weights with a pass over the training data:
:func:`recompute_average_batchnorm` does that (``facemetric average --recompute-batchnorm``),
with :func:`facemetric.training.batchnorm_statistics.recompute_batchnorm`.

The result is written as a file :func:`facemetric.inference.load_model` reads like a
checkpoint (``"model"``, ``"config"``, ``"step"`` = the last averaged step) plus
``"averaged_from"`` (the steps and file names). It holds no optimiser or RNG state, so a run
cannot resume from it, and its name (``averaged_<first>-<last>.pt`` by default) is not a
``checkpoint_*.pt``, so ``--resume`` and "the newest checkpoint of a run folder" never pick it.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemetric.atomic import atomic_write
from facemetric.inference.checkpoint import model_section, read_backbone, rebuild_backbone
from facemetric.training.checkpoint import FORMAT_VERSION, list_checkpoints, non_finite_tensors


@dataclass(frozen=True)
class AveragedWeights:
    """What :func:`average_checkpoints` returns.

    Attributes:
        weights: the averaged backbone state dict (the model's keys and dtypes).
        config: the training configuration stored in the last checkpoint.
        steps: the averaged checkpoints' steps, ascending.
        files: their file names, in the same order.
        batchnorm: ``None`` when BatchNorm's statistics are the checkpoints' average; after
            :func:`recompute_average_batchnorm`, how they were recomputed (``root``,
            ``people_file``, ``min_images``, ``images``, ``batch_size``, ``seed``,
            ``unreadable``: the files that could not be read and were replaced).
    """

    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    steps: tuple[int, ...]
    files: tuple[str, ...]
    batchnorm: dict[str, Any] | None = None


def _model_identity(config: dict[str, Any]) -> tuple[Any, ...]:
    model = config.get("model", {})
    return (model.get("name"), model.get("embedding_size"),
            repr(sorted(dict(model.get("options", {})).items())),
            config.get("data", {}).get("image_size"))


def average_checkpoints(paths: list[str | os.PathLike[str]]) -> AveragedWeights:
    """The uniform average of the backbones of ``paths`` (module docstring).

    The checkpoints are read one at a time (memory-mapped, backbone only): the memory needed
    is a few backbones (a float64 sum among them) whatever ``n``.

    Raises:
        ValueError: no path; a file that is not a facemetric checkpoint; checkpoints of
            different backbones (another ``[model]`` or image size, other keys, shapes or
            dtypes); two files of the same step; non-finite weights in one of them.
    """
    if not paths:
        raise ValueError("no checkpoint to average: pass at least one checkpoint_*.pt")
    loaded: dict[int, Path] = {}
    total: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}  # the integer buffers of the newest checkpoint
    config: dict[str, Any] = {}
    identity: tuple[Any, ...] = ()
    for raw in paths:
        path = Path(raw)
        weights, cfg, step = read_backbone(path)
        if step in loaded:
            raise ValueError(f"two checkpoints of step {step} ({loaded[step]} and {path}): "
                             "pass each checkpoint once")
        bad = non_finite_tensors(weights)
        if bad:
            raise ValueError(
                f"{path} holds non-finite weights ({', '.join(bad[:5])}); leave it out of the "
                "average (choose the steps with --from-step/--to-step)")
        if not loaded:
            reference, identity = weights, _model_identity(cfg)
            total = {k: torch.zeros_like(v, dtype=torch.float64)
                     for k, v in weights.items() if v.is_floating_point()}
        first = next(iter(loaded.values()), path)
        if _model_identity(cfg) != identity:
            raise ValueError(
                f"{path} was trained with another backbone ({_model_identity(cfg)}) than "
                f"{first} ({identity}): average checkpoints of one run only")
        if set(weights) != set(reference) or any(
                weights[k].shape != v.shape or weights[k].dtype != v.dtype
                for k, v in reference.items()):
            raise ValueError(f"{path} has other weight names, shapes or dtypes than {first}: "
                             "average checkpoints of one run only")
        for k, acc in total.items():
            acc += weights[k].double()
        if not loaded or step > max(loaded):
            config = cfg
            last = {k: v for k, v in weights.items() if not v.is_floating_point()}
        loaded[step] = path
    n = len(loaded)
    averaged = {k: (total[k] / n).to(v.dtype) if k in total else last[k].clone()
                for k, v in reference.items()}
    steps = tuple(sorted(loaded))
    return AveragedWeights(averaged, config, steps, tuple(loaded[s].name for s in steps))


def _batches(n: int, size: int) -> list[range]:
    """``0 .. n`` in chunks of ``size``, a trailing chunk of one image merged into the one
    before (BatchNorm in training mode needs two values per channel)."""
    bounds = [*range(0, n, size), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def recompute_average_batchnorm(
    averaged: AveragedWeights,
    root: str | os.PathLike[str],
    *,
    people_file: str | os.PathLike[str] | None = None,
    min_images: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> AveragedWeights:
    """``averaged`` with BatchNorm's running statistics recomputed for its weights over the
    images of ``root`` (``root/<identity>/<file>``, chosen by ``people_file`` and
    ``min_images`` as the training run chose them), in the evaluation preprocessing (resize to
    the run's ``image_size``, no augmentation), in batches of ``batch_size`` drawn in an order
    shuffled by ``seed`` — SWA's last step (module docstring of
    :mod:`facemetric.training.batchnorm_statistics`). Weights other than the running means
    and variances are unchanged.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: the stored configuration cannot rebuild the backbone; the backbone has no
            BatchNorm; ``batch_size < 2``; non-finite statistics.
    """
    from facemetric.data.folders import IdentityFolder
    from facemetric.data.transforms import eval_transform
    from facemetric.training.batchnorm_statistics import batchnorm_layers, recompute_batchnorm

    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (BatchNorm needs two values per "
                         f"channel), got {batch_size}")
    source = f"the average of {', '.join(averaged.files)}"
    size = model_section(averaged.config, source)[3]
    model = rebuild_backbone(averaged.weights, averaged.config, source)
    preprocess = eval_transform(size)
    rng = np.random.default_rng(0)  # eval_transform draws nothing; the argument is required
    folder = IdentityFolder(root, people_file=people_file, min_images=min_images,
                            transform=lambda image: preprocess(image, rng))

    # A fixed shuffle: batches of many identities, as in training (in file order a batch of
    # 64 holds a handful of identities, and BatchNorm normalises deeper layers' inputs with
    # those batches' statistics).
    order = np.random.default_rng(seed).permutation(len(folder))

    def batches() -> Any:
        chunks = _batches(len(folder), batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="batchnorm statistics", unit="batch")
        for chunk in chunks:
            yield torch.stack([folder[int(order[i])][0] for i in chunk])

    images = recompute_batchnorm(model, batches())
    state = model.state_dict()
    renewed = {f"{layer}.{stat}" for layer, _ in batchnorm_layers(model)
               for stat in ("running_mean", "running_var")}
    weights = {k: state[k].detach().clone() if k in renewed else v
               for k, v in averaged.weights.items()}
    record = {"root": str(root), "people_file": None if people_file is None else str(people_file),
              "min_images": min_images, "images": images, "batch_size": batch_size, "seed": seed,
              "unreadable": [str(f.path) for f in folder.failures]}
    return AveragedWeights(weights, averaged.config, averaged.steps, averaged.files, record)


def tail_checkpoints(
    run_dir: str | os.PathLike[str],
    *,
    from_step: int | None = None,
    to_step: int | None = None,
    last_fraction: float | None = None,
) -> list[Path]:
    """The ``checkpoint_*.pt`` files of ``run_dir`` to average, oldest first.

    ``from_step``/``to_step`` (inclusive) bound the steps; ``last_fraction = f`` keeps the
    checkpoints of steps ``≥ (1 − f) · last step`` (e.g. 1/3: the last third of the run).
    The two ways exclude each other; with neither, every checkpoint is taken.

    Raises:
        FileNotFoundError: ``run_dir`` holds no checkpoint.
        ValueError: both ways given, a fraction outside ``(0, 1]``, or an empty range.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint_*.pt file: pass the folder a "
                                "training run (or `facemetric compare`) wrote its checkpoints to")
    if last_fraction is not None:
        if from_step is not None or to_step is not None:
            raise ValueError("give either a fraction of the run or a step range, not both")
        if not 0.0 < last_fraction <= 1.0:
            raise ValueError(f"the fraction of the run must lie in (0, 1], got {last_fraction}")
        from_step = round((1.0 - last_fraction) * found[-1][0])
    low = -1 if from_step is None else from_step
    high = found[-1][0] if to_step is None else to_step
    chosen = [p for s, p in found if low <= s <= high]
    if not chosen:
        steps = [s for s, _ in found]
        raise ValueError(f"no checkpoint of {run_dir} lies in steps {low}–{high} (it has "
                         f"steps {steps[0]}–{steps[-1]}, {len(steps)} files)")
    return chosen


def save_average(averaged: AveragedWeights, path: str | os.PathLike[str]) -> Path:
    """Write ``averaged`` atomically as a file ``load_model`` reads (module docstring)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model": averaged.weights,
        "config": averaged.config,
        "step": averaged.steps[-1],
        "averaged_from": {"method": "uniform", "steps": list(averaged.steps),
                          "files": list(averaged.files),
                          "batchnorm": averaged.batchnorm or "averaged"},
    }
    return atomic_write(Path(path), lambda f: torch.save(payload, f))


def default_average_name(averaged: AveragedWeights) -> str:
    """``averaged_<first step>-<last step>.pt``."""
    return f"averaged_{averaged.steps[0]:09d}-{averaged.steps[-1]:09d}.pt"


__all__ = [
    "AveragedWeights",
    "average_checkpoints",
    "default_average_name",
    "recompute_average_batchnorm",
    "save_average",
    "tail_checkpoints",
]
