"""Choosing when to stop on identities the run never saw — not on the test pairs.

A training curve read on ``pairsDevTest`` tempts one to report its best point; choosing the
step on the test pairs is tuning on them. The honest alternative is a *validation* set from
the training split itself, made of identities that were left out of training:

- :func:`heldout_pairs` writes LFW-format verification pairs (View 2 layout: ``folds
  per_fold`` header, each fold's matched pairs then its mismatched ones) over the identities
  of a people file that have **fewer than** ``below`` images on disk. A run trained with
  ``[data] min_images = below`` on the same people file never saw any of them (LFW DevTrain
  with ``below = 4``: the 3,608 identities of 1–3 images, against the 430 a ``min_images = 4``
  run trains on). Identities are dealt to folds at random, so the folds are
  identity-disjoint, as in LFW's View 2; matched pairs come from the identities with two or
  three images, mismatched pairs from any two identities of the fold.
- :func:`select_checkpoint` scores every ``checkpoint_<step>.pt`` of a run folder on such
  pairs (images decoded once; each checkpoint embeds them with its own contract, flip test
  by default as ``facemetric eval`` does) and picks the step with the highest k-fold
  accuracy (ties: higher AUC, then the earlier step). It refuses pairs that name an identity
  the run trained on, read from the run's ``config.json``.

The chosen checkpoint is then evaluated once on the test protocol, as any other model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.atomic import atomic_write_text
from facemetric.data.folders import IdentityFolder
from facemetric.data.images import ImageLoadError, load_image
from facemetric.evaluation.protocols import PairList, read_lfw_pairs, with_existing_images
from facemetric.evaluation.verification import verification_report

_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")


@dataclass(frozen=True)
class HeldOutPairs:
    """What :func:`heldout_pairs` wrote: ``folds × per_fold`` matched and as many mismatched
    pairs over ``identities`` held-out identities (``with_matches`` of them with ≥ 2
    images)."""

    path: Path
    folds: int
    per_fold: int
    identities: int
    with_matches: int
    images: int

    def summary(self) -> str:
        return (
            f"{self.folds} folds × ({self.per_fold} matched + {self.per_fold} mismatched) pairs "
            f"over {self.identities} held-out identities ({self.with_matches} with ≥ 2 images, "
            f"{self.images} images): {self.path}"
        )


def _image_number(path: Path, name: str) -> int:
    """The ``k`` of ``<name>_<k:04d>.<ext>`` (LFW's layout), or a ``ValueError``."""
    stem = path.stem
    prefix = f"{name}_"
    tail = stem[len(prefix):] if stem.startswith(prefix) else ""
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(
            f"{path}: not named <identity>_<number> as in LFW ({name}_0001.jpg); held-out "
            "pairs are written in LFW's pairs format, which names images by number"
        )
    return int(tail)


def heldout_pairs(
    image_root: str | os.PathLike[str],
    people_file: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    below: int,
    folds: int = 10,
    per_fold: int | None = None,
    seed: int = 0,
) -> HeldOutPairs:
    """Write verification pairs over the identities of ``people_file`` with fewer than
    ``below`` images under ``image_root`` (module docstring).

    Args:
        image_root: aligned images in LFW's layout (``Name/Name_0001.jpg``).
        people_file: the training split's people list (e.g. ``peopleDevTrain.txt``).
        out_file: where the pairs go (written atomically).
        below: the training run's ``[data] min_images``; identities with at least this many
            images are the trained ones and are never used.
        folds: identity-disjoint folds.
        per_fold: matched (and mismatched) pairs per fold; ``None``: as many as the
            poorest fold can give.
        seed: the dealing of identities to folds and the sampling of pairs.

    Raises:
        ValueError: ``below < 3`` (no held-out identity could have two images), too few
            held-out identities or matched pairs for ``folds × per_fold``, or an image not
            named as in LFW.
    """
    if below < 3:
        raise ValueError(f"below must be >= 3 (identities with 2 images give the matched "
                         f"pairs), got {below}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if per_fold is not None and per_fold < 1:
        raise ValueError(f"per_fold must be >= 1, got {per_fold}")
    folder = IdentityFolder(image_root, people_file=people_file, min_images=1)
    by_name: dict[str, list[int]] = {}
    for path, label in folder.samples:
        name = folder.classes[label]
        by_name.setdefault(name, []).append(_image_number(Path(path), name))
    held = sorted(n for n, numbers in by_name.items() if len(numbers) < below)
    if len(held) < 2 * folds:
        raise ValueError(
            f"only {len(held)} identities of {people_file} have fewer than {below} images "
            f"under {image_root}: too few for {folds} folds"
        )
    rng = np.random.default_rng(seed)
    order = [held[i] for i in rng.permutation(len(held))]
    fold_names = [order[k::folds] for k in range(folds)]
    candidates = [
        [(n, a, b) for n in names for i, a in enumerate(sorted(by_name[n]))
         for b in sorted(by_name[n])[i + 1:]]
        for names in fold_names
    ]
    poorest = min(len(c) for c in candidates)
    count = poorest if per_fold is None else per_fold
    if count < 1 or count > poorest:
        raise ValueError(
            f"a fold has only {poorest} matched pairs (identities with 2 to {below - 1} "
            f"images), fewer than per_fold={count}: lower per_fold or use fewer folds"
        )
    lines = [f"{folds}\t{count}"]
    for names, matched in zip(fold_names, candidates, strict=True):
        for i in sorted(rng.choice(len(matched), size=count, replace=False).tolist()):
            name, a, b = matched[i]
            lines.append(f"{name}\t{a}\t{b}")
        sizes = np.array([len(by_name[n]) for n in names], dtype=np.int64)
        possible = (int(sizes.sum()) ** 2 - int((sizes**2).sum())) // 2
        if possible < count:
            raise ValueError(f"a fold allows only {possible} distinct mismatched pairs, fewer "
                             f"than per_fold={count}: lower per_fold or use fewer folds")
        seen: set[tuple[str, int, str, int]] = set()
        while len(seen) < count:
            i, j = rng.choice(len(names), size=2, replace=False).tolist()
            n1, n2 = sorted((names[i], names[j]))
            pair = (n1, int(rng.choice(by_name[n1])), n2, int(rng.choice(by_name[n2])))
            if pair not in seen:
                seen.add(pair)
                lines.append("\t".join(str(x) for x in pair))
    out = Path(out_file)
    atomic_write_text(out, "\n".join(lines) + "\n")
    return HeldOutPairs(
        path=out, folds=folds, per_fold=count, identities=len(held),
        with_matches=sum(1 for n in held if len(by_name[n]) >= 2),
        images=sum(len(by_name[n]) for n in held),
    )


@dataclass(frozen=True)
class CheckpointScore:
    """One checkpoint's k-fold accuracy (± std over folds) and AUC on the held-out pairs."""

    step: int
    path: Path
    accuracy: float
    accuracy_std: float
    auc: float


@dataclass(frozen=True)
class Selection:
    """Every checkpoint's score, the chosen one, and the files written."""

    scores: tuple[CheckpointScore, ...]
    best: CheckpointScore
    pairs: int
    markdown: Path
    json_file: Path

    def summary(self) -> str:
        b = self.best
        return (
            f"{len(self.scores)} checkpoints on {self.pairs} held-out pairs: best step "
            f"{b.step} ({100 * b.accuracy:.2f} ± {100 * b.accuracy_std:.2f}%, AUC "
            f"{b.auc:.4f}) → {b.path}\nreport: {self.markdown}"
        )


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = sorted(
        (int(m.group(1)), p) for p in run_dir.iterdir()
        if (m := _CHECKPOINT_RE.match(p.name)) and p.is_file()
    )
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint_<step>.pt file")
    return found


def trained_identities(run_dir: str | os.PathLike[str],
                       base: str | os.PathLike[str] | None = None) -> set[str]:
    """The identities a run trained on: its ``config.json``'s ``[data]`` (root, people
    file, folds, min_images) listed again; relative paths are taken from ``base``
    (default: the working directory, where ``train``/``compare`` was started).

    Raises:
        FileNotFoundError: no ``config.json``, or its data folder is not where it says.
    """
    config_file = Path(run_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} missing: not a facemetric training run folder")
    data: dict[str, Any] = json.loads(config_file.read_text())["data"]
    where = Path.cwd() if base is None else Path(base)

    def place(p: str | None) -> Path | None:
        return None if p is None else (where / p if not Path(p).is_absolute() else Path(p))

    root = place(data["root"])
    assert root is not None
    if not root.is_dir():
        raise FileNotFoundError(
            f"the run's data folder {root} (from {config_file}) does not exist: run from the "
            "folder training was started in, or pass base"
        )
    folder = IdentityFolder(root, people_file=place(data.get("people_file")),
                            folds=data.get("folds"), min_images=int(data.get("min_images", 1)))
    return set(folder.classes)


def select_checkpoint(
    run_dir: str | os.PathLike[str],
    pairs_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    flip: bool = True,
    device: str = "cpu",
    base: str | os.PathLike[str] | None = None,
    every: int | None = None,
) -> Selection:
    """Score every checkpoint of ``run_dir`` on held-out pairs and choose one (module
    docstring). Writes ``selection.md`` and ``selection.json`` to ``out_dir`` (default
    ``run_dir``). ``every = N`` scores only the checkpoints of steps divisible by ``N`` and
    the last one (a coarser, cheaper search).

    Raises:
        ValueError: the pairs name an identity the run trained on (they would not be
            held out), or no pair has both images loadable.
        FileNotFoundError: no checkpoint, no ``config.json``, a missing pairs file.
    """
    from facemetric.inference.load import load_model

    run = Path(run_dir)
    checkpoints = _checkpoints(run)
    if every is not None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        last = checkpoints[-1][0]
        checkpoints = [(s, p) for s, p in checkpoints if s % every == 0 or s == last]
    pairs: PairList = with_existing_images(read_lfw_pairs(pairs_file, image_root))
    names = {p.parent.name for p in pairs.path_a + pairs.path_b}
    overlap = sorted(names & trained_identities(run, base))
    if overlap:
        raise ValueError(
            f"{len(overlap)} identities of {pairs_file} were trained on by {run} (e.g. "
            f"{', '.join(overlap[:3])}): a stop chosen on them is not held out; write pairs "
            "with `facemetric heldout-pairs --below <the run's min_images>`"
        )
    paths, index_a, index_b = pairs.unique_images()
    images: list[np.ndarray] = []
    ok = np.ones(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path))
        except ImageLoadError:
            ok[i] = False
    usable = ok[index_a] & ok[index_b]
    if not usable.any():
        raise ValueError(f"no pair of {pairs_file} has both images loadable under {image_root}")
    scores: list[CheckpointScore] = []
    for step, path in checkpoints:
        encoder = load_model(path, device=device, flip_test=flip)
        emb = np.full((len(paths), encoder.contract.embedding_size), np.nan)
        emb[ok] = encoder.embed_faces(images)
        s = np.einsum("ij,ij->i", emb[index_a], emb[index_b])[usable]
        report = verification_report(s, pairs.is_same[usable], pairs.fold[usable],
                                     far_targets=())
        scores.append(CheckpointScore(step, path, report.accuracy, report.accuracy_std,
                                      report.auc))
    best = max(scores, key=lambda c: (c.accuracy, c.auc, -c.step))
    out = run if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "selection.md"
    js = out / "selection.json"
    rows = [
        f"| {c.step:,} | {100 * c.accuracy:.2f} ± {100 * c.accuracy_std:.2f}% | {c.auc:.4f} |"
        + (" **chosen** |" if c is best else " |")
        for c in scores
    ]
    atomic_write_text(md, "\n".join([
        f"# Checkpoint selection: {run}",
        "",
        f"Held-out pairs: {pairs_file} ({int(usable.sum())} scored, flip test "
        f"{'on' if flip else 'off'}); identities disjoint from the run's training set.",
        "",
        "| step | accuracy | AUC | |",
        "|---:|---:|---:|---|",
        *rows,
        "",
    ]))
    atomic_write_text(js, json.dumps({
        "run": str(run), "pairs_file": str(pairs_file), "pairs": int(usable.sum()),
        "flip": flip, "best_step": best.step, "best_checkpoint": str(best.path),
        "scores": [{"step": c.step, "checkpoint": str(c.path), "accuracy": c.accuracy,
                    "accuracy_std": c.accuracy_std, "auc": c.auc} for c in scores],
    }, indent=2) + "\n")
    return Selection(tuple(scores), best, int(usable.sum()), md, js)


def plot_selection(
    selection: Selection,
    path: str | os.PathLike[str],
    *,
    monitor: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
    title: str | None = None,
) -> Path:
    """A PNG of a :class:`Selection`: held-out accuracy (± its standard deviation over
    folds) and AUC against the step, the chosen checkpoint marked. ``monitor`` adds other
    accuracy curves, ``{name: (steps, accuracies in [0, 1])}`` — e.g. the pairs a
    ``compare`` run was watched on — to *see* whether they rise and fall with the held-out
    curve, never to choose by. Written atomically (``facemetric.evaluation.plots``); needs
    matplotlib.

    Raises:
        ValueError: a monitor curve whose steps and accuracies differ in length, or an
            accuracy outside [0, 1].
        ImportError: matplotlib is not installed.
    """
    from facemetric.evaluation.plots import _new_figure, _save_figure

    curves = dict(monitor or {})
    for name, (steps, acc) in curves.items():
        if len(steps) != len(acc):
            raise ValueError(f"monitor curve {name!r}: {len(steps)} steps but {len(acc)} "
                             "accuracies")
        if any(not 0.0 <= float(a) <= 1.0 for a in acc):
            raise ValueError(f"monitor curve {name!r}: accuracies must lie in [0, 1] "
                             "(fractions, not percent)")
    steps = np.array([c.step for c in selection.scores])
    acc = 100 * np.array([c.accuracy for c in selection.scores])
    std = 100 * np.array([c.accuracy_std for c in selection.scores])
    fig = _new_figure(10.0, 4.0)
    left, right = fig.subplots(1, 2)
    label = f"held-out identities ({selection.pairs} pairs)"
    (line,) = left.plot(steps, acc, "o-", ms=3, label=label)
    left.fill_between(steps, acc - std, acc + std, color=line.get_color(), alpha=0.15,
                      label="± std over folds")
    best = selection.best
    left.plot([best.step], [100 * best.accuracy], "*", ms=14, color=line.get_color(),
              label=f"chosen: step {best.step:,}")
    for name, (m_steps, m_acc) in curves.items():
        left.plot(list(m_steps), [100 * float(a) for a in m_acc], "--", lw=1.2, label=name)
    left.set_xlabel("step")
    left.set_ylabel("verification accuracy (%)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.plot(steps, [c.auc for c in selection.scores], "o-", ms=3, color=line.get_color())
    right.plot([best.step], [best.auc], "*", ms=14, color=line.get_color())
    right.set_xlabel("step")
    right.set_ylabel("AUC (held-out identities)")
    right.grid(alpha=0.3)
    text = title or "Checkpoint selection on held-out identities"
    fig.suptitle(text)
    fig.tight_layout()
    return _save_figure(fig, path, text)


__all__: Sequence[str] = [
    "CheckpointScore",
    "HeldOutPairs",
    "Selection",
    "heldout_pairs",
    "plot_selection",
    "select_checkpoint",
    "trained_identities",
]
