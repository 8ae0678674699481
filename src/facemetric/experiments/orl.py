"""The ORL example: the real training pipeline on 400 real faces, measured on people it never saw.

``run_orl_example(data_root, out_dir)`` uses the AT&T / ORL faces (40 people × 10 grayscale
92×112 images, ``s1`` .. ``s40``):

1. picks 30 identities at random (seeded) for training and writes them as an LFW-style
   people list (``train_people.txt``, ``Name count`` lines); the other 10 are never trained
   on (``unseen_people.txt``);
2. builds a training configuration (:func:`orl_config`) for the registered ``small_cnn``
   backbone on RGB input (ORL is grayscale: every channel holds the same value) at a small
   size, with P×K batches for pair losses and plain shuffled batches for classifier losses,
   and trains it with :func:`facemetric.training.train` — the same loop, sampler
   (``PKSampler``), dataset (``IdentityFolder`` + ``[data] people_file``), checkpoints, log
   and loss curve as any other run;
3. loads the untrained network (step 0, saved before training starts) and the trained run
   with :func:`facemetric.inference.load_model`, embeds the 100 images of the unseen
   identities with :func:`facemetric.inference.embed_files` and measures each
   (:func:`measure_unseen`):

   - **leave-one-out 1-NN accuracy**: each image labelled by its most cosine-similar other
     image (``retrieval_metrics(...).precision_at_1``; chance ``9/99 ≈ 0.091``);
   - **10-fold verification accuracy** on *all* pairs of unseen images: 450 same-identity
     and 4,500 different-identity pairs, the cosine threshold of each fold chosen on the
     other nine (``verification_report``). Images are in ``IdentityFolder`` order
     (identities sorted by name, so ``s10`` before ``s2``; files in natural order), pairs
     ``(i, j)`` with ``i < j`` in row-major order, pair ``n`` in fold ``n mod 10``. Because
     different-identity pairs are 10 times as many, rejecting every pair already scores
     ``4500/4950 ≈ 0.909``; the AUC and EER of the same report are not affected by the
     imbalance.

It writes ``metrics.json`` (atomically) to ``out_dir``; the training run (checkpoints,
``log.csv``, ``loss_curve.png``, ``config.json``) lives in ``out_dir/train`` and the step-0
weights in ``out_dir/untrained``. Running it again into the same ``out_dir`` with the same
settings reuses (or finishes) the run there instead of training again.

Measured at the defaults (48×48, 150 AdamW steps, seed 0; about 8 s of training on one CPU
thread), ArcFace: verification 0.942 → 0.968, EER 0.192 → 0.067, 1-NN 1.00 → 1.00 (ORL is
easy: an untrained network already gets 1-NN right). Over six seeds every margin and pair
loss lands at 0.958–0.988 verification and every control (untrained, shuffled labels) at
0.934–0.954; ``tests/test_real_faces_orl.py`` lists the measurements per loss. On a shared
machine, ``torch.set_num_threads(1)`` can be several times faster than the default.

ORL credit: AT&T Laboratories Cambridge (formerly the Olivetti Research Laboratory).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.atomic import atomic_write, atomic_write_text

#: where ORL comes from, for the message shown when it is missing
ORL_SOURCE = (
    "the AT&T / ORL face database (AT&T Laboratories Cambridge; "
    "https://cam-orl.co.uk/facedatabase.html): 40 folders s1..s40 of ten 92x112 PGM images"
)
#: ORL's identity folders
ORL_IDENTITIES: tuple[str, ...] = tuple(f"s{i}" for i in range(1, 41))
#: identities trained on; the rest are the unseen test identities
TRAIN_IDENTITIES = 30

#: ``[loss]`` tables of the losses the example knows by name. Any other loss a training
#: config can name (``facemetric.training.builders.available_losses``) also works, with its
#: default parameters.
LOSSES: dict[str, dict[str, Any]] = {
    "arcface": {"name": "arcface", "scale": 16.0, "margin": 0.3},
    "cosface": {"name": "cosface", "scale": 16.0, "margin": 0.2},
    "softmax": {"name": "softmax"},
    "triplet": {"name": "triplet", "margin": 0.2, "miner": "batch_hard", "distance": "cosine"},
    "multi_similarity": {"name": "multi_similarity", "miner": "multi_similarity",
                         "distance": "cosine"},
    "contrastive": {"name": "contrastive", "pos_margin": 0.0, "neg_margin": 0.5,
                    "distance": "cosine"},
}

#: the rest of the training configuration (``orl_config`` fills in paths, loss and length)
BASE_CONFIG: dict[str, Any] = {
    "seed": 0,
    "data": {"image_size": 48, "min_images": 1, "num_workers": 0, "verify": True},
    "augment": {"flip": True},
    "model": {"name": "small_cnn", "embedding_size": 64,
              "options": {"in_channels": 3, "width": 16}},
    "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 5e-4},
    "schedule": {"name": "cosine", "warmup_steps": 0},
    "train": {"log_every": 10, "keep_checkpoints": 1, "device": "cpu"},
}
#: P×K batches for pair losses (P identities × K images), plain batches for classifiers
PK_BATCH: dict[str, int] = {"p": 8, "k": 4}
PLAIN_BATCH: dict[str, int] = {"size": 32}
VERIFICATION_FOLDS = 10


# ----------------------------------------------------------------------------- data


def find_orl(data_root: str | os.PathLike[str]) -> Path:
    """The ORL folder: ``data_root/orl``, or ``data_root`` itself when it holds ``s1`` ..

    Raises:
        FileNotFoundError: no folder with all of ``s1`` .. ``s40`` (each holding images); the
            message says where ORL was expected and where to get it.
    """
    root = Path(data_root)
    orl = root if (root / "s1").is_dir() and not (root / "orl").is_dir() else root / "orl"
    if not orl.is_dir():
        raise FileNotFoundError(
            f"the ORL example needs ORL faces at {orl} (folders s1..s40 of PGM images), but "
            f"there is no such folder. Get {ORL_SOURCE}, unpack it as {orl} and pass the "
            "folder holding it (FACEMETRIC_DATA for the tests)."
        )
    missing = [
        name for name in ORL_IDENTITIES
        if not (orl / name).is_dir() or not any((orl / name).glob("*.pgm"))
    ]
    if missing:
        raise FileNotFoundError(
            f"{orl} does not hold the whole ORL set (folders s1..s40 of PGM images): "
            f"{len(missing)} missing or empty, e.g. {missing[:5]}. Get {ORL_SOURCE} and "
            f"unpack it as {orl}."
        )
    return orl


def split_identities(seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(training identities, unseen identities)``: a seeded random 30 / 10 split of
    ``s1`` .. ``s40``, each part in natural order (``s2`` before ``s10``)."""
    order = np.random.default_rng([seed, 0x0A1]).permutation(len(ORL_IDENTITIES))
    chosen = {ORL_IDENTITIES[i] for i in order[:TRAIN_IDENTITIES]}
    train = tuple(n for n in ORL_IDENTITIES if n in chosen)
    unseen = tuple(n for n in ORL_IDENTITIES if n not in chosen)
    return train, unseen


def write_people_file(path: Path, orl_root: Path, names: Sequence[str]) -> Path:
    """Write ``names`` as an LFW View-1 people list (count line, then ``Name count``; the
    count is the number of ``.pgm`` files in each folder) atomically; return ``path``."""
    lines = [str(len(names))]
    lines += [f"{n} {sum(1 for _ in (orl_root / n).glob('*.pgm'))}" for n in names]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def orl_config(
    orl_root: Path,
    people_file: Path,
    run_dir: Path,
    *,
    loss: str | dict[str, Any] = "arcface",
    steps: int = 150,
    seed: int = 0,
    image_size: int = 48,
) -> dict[str, Any]:
    """The example's training configuration as a dictionary for
    :func:`facemetric.training.config_from_dict`.

    Args:
        orl_root: the ORL folder (``[data] root``).
        people_file: the training identities (``[data] people_file``).
        run_dir: ``output_dir`` of the run.
        loss: a key of :data:`LOSSES`, any loss name a config accepts (its defaults), or a
            whole ``[loss]`` table.
        steps: optimiser steps (``[train] max_steps``; the run checkpoints once, at the end).
        seed: ``seed`` of the run (initialisation, batches, augmentation).
        image_size: side of the square network input (ORL's 92×112 faces are resized).

    Raises:
        ValueError: an unknown loss name (the message lists the choices), ``steps < 1``.
    """
    from facemetric.training.builders import available_losses, loss_entry

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if isinstance(loss, dict):
        table = copy.deepcopy(loss)
    elif loss in LOSSES:
        table = copy.deepcopy(LOSSES[loss])
    else:
        try:
            loss_entry(loss)
        except ValueError:
            raise ValueError(
                f"unknown loss {loss!r}: use one of the example's {sorted(LOSSES)} or a loss "
                f"name a training config accepts ({sorted(available_losses())})"
            ) from None
        table = {"name": loss}
    raw = copy.deepcopy(BASE_CONFIG)
    raw["seed"] = seed
    raw["output_dir"] = str(run_dir)
    raw["data"].update(root=str(orl_root), people_file=str(people_file), image_size=image_size)
    raw["loss"] = table
    classifier = loss_entry(str(table.get("name", ""))).classifier
    raw["batch"] = dict(PLAIN_BATCH if classifier else PK_BATCH)
    raw["train"].update(max_steps=steps, checkpoint_every=steps)
    return raw


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class OrlScores:
    """One network measured on the unseen identities (see the module docstring).

    ``nn_accuracy``: leave-one-out 1-NN accuracy; ``verification_*``: mean and sample std
    over the 10 folds; ``auc``/``eer`` of the same pairs; ``map_at_r``: MAP@R of the same
    leave-one-out search; ``failed_images``: files that could not be embedded (left out).
    """

    step: int
    nn_accuracy: float
    verification_accuracy: float
    verification_std: float
    auc: float
    eer: float
    map_at_r: float
    num_images: int
    same_pairs: int
    different_pairs: int
    failed_images: int = 0


def all_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, is_same)`` for every pair ``i < j``, in row-major order ``(0,1), (0,2) ..``."""
    i, j = np.triu_indices(len(labels), k=1)
    return i, j, labels[i] == labels[j]


def measure_unseen(
    embeddings: np.ndarray, labels: Sequence[int] | np.ndarray, step: int,
    folds: int = VERIFICATION_FOLDS,
) -> OrlScores:
    """Leave-one-out 1-NN and all-pairs ``folds``-fold verification of ``(N, D)``
    embeddings (cosine). Rows with a ``NaN`` (files that failed to embed) are left out and
    counted in ``failed_images``.

    Raises:
        ValueError: fewer than two embedded images of some identity, or too few pairs for
            ``folds`` folds.
    """
    from facemetric.evaluation.retrieval import retrieval_metrics
    from facemetric.evaluation.verification import cosine_pair_scores, verification_report

    e = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    ok = np.isfinite(e).all(axis=1)
    e, y = e[ok], y[ok]
    _, counts = np.unique(y, return_counts=True)
    if counts.size < 2 or counts.min() < 2:
        raise ValueError(
            "leave-one-out 1-NN needs at least two identities with two embedded images each; "
            f"got image counts {counts.tolist()} ({int((~ok).sum())} failed to embed)"
        )
    retrieval = retrieval_metrics(e, y, recall_ks=(1,))
    i, j, same = all_pairs(y)
    report = verification_report(cosine_pair_scores(e[i], e[j]), same, folds=folds,
                                 far_targets=())
    return OrlScores(
        step=step,
        nn_accuracy=retrieval.precision_at_1,
        verification_accuracy=report.accuracy,
        verification_std=report.accuracy_std,
        auc=report.auc,
        eer=report.eer,
        map_at_r=retrieval.map_at_r,
        num_images=len(y),
        same_pairs=int(same.sum()),
        different_pairs=int((~same).sum()),
        failed_images=int((~ok).sum()),
    )


def embed_and_measure(
    run_dir: Path, paths: Sequence[Path], labels: Sequence[int], progress: bool = False
) -> OrlScores:
    """``load_model(run_dir)`` → ``embed_files`` → :func:`measure_unseen` at the run's step."""
    from facemetric.inference import embed_files, load_model

    encoder = load_model(run_dir)
    files = embed_files(encoder, paths, progress=progress)
    step = int(encoder.contract.extra.get("step", 0))
    return measure_unseen(files.embeddings, labels, step)


# ----------------------------------------------------------------------------- result


@dataclass(frozen=True)
class OrlResult:
    """What :func:`run_orl_example` trained, measured and wrote.

    ``losses[i]`` is the training loss of step ``i + 1``; ``initial_loss``/``final_loss``
    are the means over the first and last tenth of the steps. ``train_seconds`` covers
    this call's training only (0 when a finished run was reused).
    """

    loss: str
    steps: int
    seed: int
    image_size: int
    train_identities: tuple[str, ...]
    unseen_identities: tuple[str, ...]
    untrained: OrlScores
    trained: OrlScores
    initial_loss: float
    final_loss: float
    train_seconds: float
    run_dir: Path
    untrained_dir: Path
    people_file: Path
    loss_curve: Path | None
    metrics_path: Path
    losses: list[float] = field(repr=False)

    @property
    def reject_all_accuracy(self) -> float:
        """Verification accuracy of rejecting every pair (the majority class)."""
        t = self.trained
        return t.different_pairs / (t.same_pairs + t.different_pairs)

    @property
    def chance_nn_accuracy(self) -> float:
        """Expected leave-one-out 1-NN accuracy of a random neighbour."""
        t = self.trained
        per_identity = t.same_pairs * 2 / t.num_images  # images of one's own identity, minus 1
        return per_identity / (t.num_images - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: what ``metrics.json`` holds (without the per-step losses)."""
        out = {k: v for k, v in asdict(self).items() if k != "losses"}
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        out["reject_all_accuracy"] = self.reject_all_accuracy
        out["chance_nn_accuracy"] = self.chance_nn_accuracy
        return out

    def summary(self) -> str:
        """A small table: untrained vs trained on the unseen identities, and the files."""
        t = self.trained
        lines = [
            f"ORL example: small_cnn at {self.image_size}x{self.image_size} + {self.loss}, "
            f"{self.steps} steps ({self.train_seconds:.1f} s), trained on "
            f"{len(self.train_identities)} identities, measured on "
            f"{len(self.unseen_identities)} unseen ({t.num_images} images)",
            f"{'':<10}{'step':>6}{'1-NN (LOO)':>12}{'verification (10-fold)':>25}"
            f"{'AUC':>8}{'EER':>8}",
        ]
        for name, s in (("untrained", self.untrained), ("trained", t)):
            verif = f"{s.verification_accuracy:.3f} ± {s.verification_std:.3f}"
            lines.append(f"{name:<10}{s.step:>6}{s.nn_accuracy:>12.3f}{verif:>25}"
                         f"{s.auc:>8.3f}{s.eer:>8.3f}")
        lines.append(
            f"chance: 1-NN {self.chance_nn_accuracy:.3f}; verification "
            f"{self.reject_all_accuracy:.3f} by rejecting every pair ({t.same_pairs} same, "
            f"{t.different_pairs} different)"
        )
        lines.append(f"training loss {self.initial_loss:.3f} → {self.final_loss:.3f}; "
                     f"loss curve: {self.loss_curve}; metrics: {self.metrics_path}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the example


def _save_untrained(model: Any, config: Any, folder: Path) -> Path:
    """The step-0 weights as a checkpoint ``load_model`` reads (model + config + step)."""
    import torch

    from facemetric.training.checkpoint import CHECKPOINT_FORMAT

    state = {
        "model": {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
        "step": 0,
    }
    return atomic_write(folder / CHECKPOINT_FORMAT.format(step=0),
                        lambda f: torch.save(state, f))


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two configuration dictionaries."""
    keys: list[str] = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key not in ("params", "options"):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _window_mean(values: Sequence[float], first: bool) -> float:
    window = max(1, len(values) // 10)
    part = values[:window] if first else values[-window:]
    return float(np.mean(part)) if part else math.nan


def run_orl_example(
    data_root: Path,
    out_dir: Path,
    steps: int = 150,
    loss: str = "arcface",
    progress: bool = True,
    *,
    seed: int = 0,
    image_size: int = 48,
    configure: Callable[[dict[str, Any]], None] | None = None,
) -> OrlResult:
    """Train the small CNN on 30 ORL identities with the real training loop and measure it on
    the 10 it never saw, before and after training (module docstring).

    Args:
        data_root: the folder holding ``orl/`` (or the ORL folder itself).
        out_dir: where the run, the step-0 weights, the people lists and ``metrics.json`` go.
        steps: training steps.
        loss: a key of :data:`LOSSES` (``arcface``, ``cosface``, ``softmax``, ``triplet``,
            ``multi_similarity``, ``contrastive``) or any loss name a config accepts.
        progress: progress bars for training and embedding.
        seed: decides the identity split, the initialisation, the batches and augmentation.
        image_size: side of the network's square input.
        configure: called on the configuration dictionary before it is checked, to change
            anything else (e.g. the learning rate).

    Returns:
        :class:`OrlResult`; ``result.summary()`` is a printable table.

    Raises:
        FileNotFoundError: ORL is not under ``data_root`` (the message says where it was
            expected and where to get it). Nothing is written then.
        FileExistsError: ``out_dir`` holds a run trained with different settings.
        ValueError: an unknown loss or invalid settings.
    """
    from facemetric.data.folders import IdentityFolder
    from facemetric.training import config_from_dict, train
    from facemetric.training.builders import build_model
    from facemetric.training.checkpoint import list_checkpoints
    from facemetric.training.loop import seed_everything

    orl = find_orl(data_root)
    out_dir = Path(out_dir)
    run_dir = out_dir / "train"
    raw = orl_config(orl, out_dir / "train_people.txt", run_dir, loss=loss, steps=steps,
                     seed=seed, image_size=image_size)
    if configure is not None:
        configure(raw)
    config = config_from_dict(raw, source=f"ORL example ({loss})")
    train_ids, unseen_ids = split_identities(config.seed)
    resume = run_dir.is_dir() and bool(list_checkpoints(run_dir))
    if resume:
        stored = run_dir / "config.json"
        saved = json.loads(stored.read_text(encoding="utf-8")) if stored.is_file() else {}
        changed = _changed_keys(saved, config.to_dict())
        if changed:
            raise FileExistsError(
                f"{run_dir} holds a run trained with other settings ({', '.join(changed[:5])} "
                "differ); choose another out_dir or delete that folder"
            )

    out_dir.mkdir(parents=True, exist_ok=True)
    people = write_people_file(out_dir / "train_people.txt", orl, train_ids)
    unseen_file = write_people_file(out_dir / "unseen_people.txt", orl, unseen_ids)
    unseen = IdentityFolder(orl, people_file=unseen_file)
    paths = [p for p, _ in unseen.samples]
    labels = [y for _, y in unseen.samples]

    # the untrained network is the one training starts from: built as train() would
    seed_everything(config.seed)
    model = build_model(config.model)
    untrained_dir = out_dir / "untrained"
    _save_untrained(model, config, untrained_dir)
    before = embed_and_measure(untrained_dir, paths, labels, progress)

    result = train(config, resume=resume, model=model, progress=progress)
    if result.checkpoint is None:
        raise RuntimeError(f"training wrote no checkpoint under {run_dir}")
    after = embed_and_measure(run_dir, paths, labels, progress)

    orl_result = OrlResult(
        loss=loss,
        steps=result.steps,
        seed=config.seed,
        image_size=config.data.image_size,
        train_identities=train_ids,
        unseen_identities=unseen_ids,
        untrained=before,
        trained=after,
        initial_loss=_window_mean(result.losses, first=True),
        final_loss=_window_mean(result.losses, first=False),
        train_seconds=result.wall_seconds if result.resumed_from != result.steps else 0.0,
        run_dir=run_dir,
        untrained_dir=untrained_dir,
        people_file=people,
        loss_curve=result.loss_plot,
        metrics_path=out_dir / "metrics.json",
        losses=list(result.losses),
    )
    atomic_write_text(orl_result.metrics_path,
                      json.dumps(orl_result.to_dict(), indent=2, allow_nan=False) + "\n")
    return orl_result


__all__ = [
    "BASE_CONFIG",
    "LOSSES",
    "ORL_IDENTITIES",
    "ORL_SOURCE",
    "TRAIN_IDENTITIES",
    "OrlResult",
    "OrlScores",
    "all_pairs",
    "embed_and_measure",
    "find_orl",
    "measure_unseen",
    "orl_config",
    "run_orl_example",
    "split_identities",
    "write_people_file",
]
