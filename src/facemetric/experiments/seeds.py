"""One ``compare`` at several seeds: mean ± standard deviation over seeds, with seed bands.

A run's 10-fold standard deviation measures how the *test pairs* vary, not how the
*training* varies (initialisation, batch order, augmentation draws): two single runs a point
apart can swap places at another seed. ``compare_seeds`` runs
:func:`~facemetric.experiments.compare.compare` once per seed into ``out_dir/seed<k>/``
(each resumable as ``compare`` is; a finished seed is reused) and :func:`summarize_seeds`
reads their ``metrics.json`` back and writes, in ``out_dir``:

- ``<name>.md``: per configuration the final held-out numbers (all pairs, flip test) as
  mean ± sample standard deviation over seeds (``ddof = 1``) with each seed's value —
  accuracy, AUC, EER, TAR at the table's FAR, training time — and the **paired
  differences** against a reference configuration. At one seed every configuration reads
  the same batches in the same order (``compare`` records a digest of the order; a
  difference is called paired only when the digests agree), so the seed-by-seed difference
  removes the part of the variation the two runs share: its mean ± std over seeds and the
  number of seeds at which the configuration is ahead;
- ``<name>.png``: the 2×2 convergence panels of ``compare`` with one line per
  configuration at the mean over seeds and a band of ± one standard deviation: the training
  loss (each seed's running mean first, as ``compare`` smooths it) and the held-out
  accuracy against steps and against training time (the x of a point is the seeds' mean
  training time at that step);
- ``<name>.json``: every number above.

Seeds that stopped at different steps (a time budget) are cut to the steps all of them
reached for the bands; the final numbers are each run's own.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.atomic import atomic_write_text
from facemetric.evaluation.plots import _new_figure
from facemetric.evaluation.report import _json_safe, _table
from facemetric.experiments.compare import (
    CompareResult,
    compare,
    finish_convergence_panels,
    smooth_losses,
)

#: the FAR whose TAR the table shows: 1e-2, which 1,000 pairs (500 impostor pairs) resolve;
#: ``compare``'s per-seed table also shows 1e-3
TABLE_FAR = 1e-2
#: the final numbers summarised over seeds, as stored in ``metrics.json``
_FINAL_KEYS = ("accuracy", "auc", "eer", "tar")


def seed_folder(out_dir: str | os.PathLike[str], seed: int) -> Path:
    """Where ``compare_seeds`` puts seed ``seed``'s ``compare``: ``out_dir/seed<seed>``."""
    return Path(out_dir) / f"seed{int(seed)}"


@dataclass(frozen=True)
class SeedRun:
    """One configuration at one seed, as read from that seed's ``metrics.json``."""

    seed: int
    name: str
    loss: str
    losses: np.ndarray
    step_wall: np.ndarray
    eval_steps: np.ndarray
    eval_wall: np.ndarray
    eval_accuracy: np.ndarray
    final: dict[str, float | None]
    wall_seconds: float
    data_order: str | None


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (``ddof = 1``; NaN for one value) of ``values``."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else math.nan

    def text(self, scale: float = 100.0, digits: int = 2, unit: str = "%") -> str:
        if not self.values:
            return "—"
        std = "" if math.isnan(self.std) else f" ± {scale * self.std:.{digits}f}"
        return f"{scale * self.mean:.{digits}f}{std}{unit}"


@dataclass(frozen=True)
class SeedSummary:
    """The summary of one configuration over seeds, and its difference to the reference."""

    name: str
    loss: str
    seeds: tuple[int, ...]
    final: dict[str, Spread]
    wall_seconds: Spread
    difference: Spread | None  # accuracy minus the reference's, per seed (paired)
    ahead: int  # seeds at which the accuracy is above the reference's
    paired: bool  # every seed's data-order digest equals the reference's


@dataclass(frozen=True)
class SeedComparison:
    """What ``summarize_seeds`` / ``compare_seeds`` wrote, and the summaries."""

    summaries: tuple[SeedSummary, ...]
    reference: str
    table: Path
    plot: Path
    metrics_json: Path
    table_text: str
    per_seed: tuple[CompareResult, ...] = ()

    def summary(self) -> str:
        return f"{self.table_text}\nplot: {self.plot}\ntable: {self.table}"


def _tar(final: dict[str, Any]) -> float | None:
    tars = final.get("tar_at_far") or {}
    for far, tar in tars.items():
        if math.isclose(float(far), TABLE_FAR, rel_tol=1e-6):
            return None if tar is None else float(tar)
    return None


def read_seed_runs(out_dir: str | os.PathLike[str], seeds: Sequence[int]) -> list[SeedRun]:
    """Every configuration's run at every seed, from ``out_dir/seed<k>/metrics.json``.

    Raises:
        FileNotFoundError: a seed has no ``metrics.json`` (its ``compare`` did not finish:
            run it, or ``compare_seeds``, again — it resumes).
        ValueError: the seeds did not run the same configurations, or a file is not a
            ``compare`` metrics file.
    """
    runs: list[SeedRun] = []
    names_first: list[str] | None = None
    for seed in seeds:
        path = seed_folder(out_dir, seed) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: seed {seed}'s compare has not finished; run "
                "`facemetric compare ... --seeds` again (it resumes) or leave that seed out"
            )
        try:
            data = json.loads(path.read_text())
            entries = data["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a compare metrics.json: {exc}") from exc
        names = [e["name"] for e in entries]
        if names_first is None:
            names_first = names
        elif names != names_first:
            raise ValueError(
                f"seed {seed} ran {names}, seed {seeds[0]} ran {names_first}: the seeds must "
                "compare the same configurations"
            )
        for e in entries:
            final = e.get("final") or {}
            runs.append(SeedRun(
                seed=int(seed), name=e["name"], loss=e["loss"],
                losses=np.asarray(e["losses"], dtype=np.float64),
                step_wall=np.asarray(e["step_wall"], dtype=np.float64),
                eval_steps=np.asarray(e["eval"]["steps"], dtype=np.int64),
                eval_wall=np.asarray(e["eval"]["wall"], dtype=np.float64),
                eval_accuracy=np.asarray(e["eval"]["accuracy"], dtype=np.float64),
                final={"accuracy": final.get("accuracy"), "auc": final.get("auc"),
                       "eer": final.get("eer"), "tar": _tar(final) if final else None},
                wall_seconds=float(e["wall_seconds"]), data_order=e.get("data_order"),
            ))
    return runs


def _spread(values: Sequence[float | None]) -> Spread:
    return Spread(tuple(float(v) for v in values if v is not None))


def _summaries(runs: Sequence[SeedRun], reference: str) -> list[SeedSummary]:
    names = list(dict.fromkeys(r.name for r in runs))
    by = {(r.name, r.seed): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    out = []
    for name in names:
        mine = [by[(name, s)] for s in seeds]
        refs = [by[(reference, s)] for s in seeds]
        diffs = [
            None if a.final["accuracy"] is None or b.final["accuracy"] is None
            else a.final["accuracy"] - b.final["accuracy"]
            for a, b in zip(mine, refs, strict=True)
        ]
        out.append(SeedSummary(
            name=name, loss=mine[0].loss, seeds=tuple(seeds),
            final={k: _spread([r.final[k] for r in mine]) for k in _FINAL_KEYS},
            wall_seconds=_spread([r.wall_seconds for r in mine]),
            difference=None if name == reference else _spread(diffs),
            ahead=sum(1 for d in diffs if d is not None and d > 0),
            paired=all(a.data_order is not None and a.data_order == b.data_order
                       for a, b in zip(mine, refs, strict=True)),
        ))
    return out


def seed_bands(runs: Sequence[SeedRun]) -> dict[str, np.ndarray]:
    """Mean and std over seeds of one configuration's curves (module docstring).

    Returns ``steps``, ``wall``, ``loss``, ``loss_std`` (per step, cut to the steps every seed
    reached) and ``eval_steps``, ``eval_wall``, ``eval_acc``, ``eval_acc_std`` (at the held-out
    checks every seed made). Standard deviations use ``ddof = 1`` (zeros for one seed).
    """
    n = min(r.losses.shape[0] for r in runs)
    ddof = 1 if len(runs) > 1 else 0
    loss = np.stack([smooth_losses(r.losses)[:n] for r in runs])
    wall = np.stack([r.step_wall[:n] for r in runs])
    common = sorted(set.intersection(*(set(r.eval_steps.tolist()) for r in runs)))
    # per run, where each common check sits in its own (sorted, distinct) eval steps
    where = [np.searchsorted(r.eval_steps, common).astype(np.int64) for r in runs]
    acc = np.stack([r.eval_accuracy[i] for r, i in zip(runs, where, strict=True)])
    ewall = np.stack([r.eval_wall[i] for r, i in zip(runs, where, strict=True)])
    return {
        "steps": np.arange(1, n + 1), "wall": wall.mean(axis=0),
        "loss": loss.mean(axis=0), "loss_std": loss.std(axis=0, ddof=ddof),
        "eval_steps": np.asarray(common, dtype=np.int64), "eval_wall": ewall.mean(axis=0),
        "eval_acc": acc.mean(axis=0), "eval_acc_std": acc.std(axis=0, ddof=ddof),
    }


def plot_seed_bands(runs: Sequence[SeedRun], path: str | os.PathLike[str],
                    title: str = "Convergence over seeds") -> Path:
    """The 2×2 panels of ``compare`` with mean lines and ± 1 std seed bands; PNG, atomic."""
    fig = _new_figure(12.0, 8.5)
    axes = fig.subplots(2, 2)
    names = list(dict.fromkeys(r.name for r in runs))
    for name in names:
        mine = [r for r in runs if r.name == name]
        b = seed_bands(mine)
        label = f"{name} ({mine[0].loss}, {len(mine)} seeds)"
        (line,) = axes[0, 0].plot(b["steps"], b["loss"], label=label)
        color = line.get_color()
        lo, hi = b["loss"] - b["loss_std"], b["loss"] + b["loss_std"]
        axes[0, 0].fill_between(b["steps"], lo, hi, color=color, alpha=0.2, lw=0)
        axes[0, 1].plot(b["wall"], b["loss"], color=color, label=label)
        axes[0, 1].fill_between(b["wall"], lo, hi, color=color, alpha=0.2, lw=0)
        if b["eval_steps"].size:
            acc, std = 100.0 * b["eval_acc"], 100.0 * b["eval_acc_std"]
            for ax, x in ((axes[1, 0], b["eval_steps"]), (axes[1, 1], b["eval_wall"])):
                ax.plot(x, acc, "o-", color=color, ms=3, label=label)
                ax.fill_between(x, acc - std, acc + std, color=color, alpha=0.2, lw=0)
    log_loss = bool(runs) and all(r.losses.size and r.losses.min() > 0 for r in runs)
    return finish_convergence_panels(
        fig, axes, path, f"{title} (line: mean, band: ± 1 std over seeds)",
        "training time (s, mean over seeds)", log_loss=log_loss)


def _markdown(summaries: Sequence[SeedSummary], reference: str, header: list[str],
              plot_name: str) -> str:
    cols = ["run", "loss", "seeds", "accuracy (mean ± std over seeds)", "each seed",
            "AUC", "EER", f"TAR@FAR={TABLE_FAR:g}", "train time",
            f"accuracy − {reference} (paired)", "seeds ahead"]
    rows = []
    for s in summaries:
        acc = s.final["accuracy"]
        rows.append([
            s.name, s.loss, str(len(s.seeds)), acc.text(),
            " / ".join(f"{100 * v:.2f}" for v in acc.values) or "—",
            s.final["auc"].text(scale=1.0, digits=4, unit=""), s.final["eer"].text(),
            s.final["tar"].text(), s.wall_seconds.text(scale=1.0, digits=0, unit=" s"),
            "—" if s.difference is None else (
                s.difference.text(unit=" pts") + ("" if s.paired else " (unpaired)")),
            "—" if s.difference is None else f"{s.ahead}/{len(s.difference.values)}",
        ])
    return "\n".join([*header, "", *_table(cols, rows), "", f"![seed bands]({plot_name})"]) + "\n"


def summarize_seeds(
    out_dir: str | os.PathLike[str],
    seeds: Sequence[int],
    *,
    runs: Sequence[str] | None = None,
    reference: str | None = None,
    name: str = "seeds",
) -> SeedComparison:
    """Read ``out_dir/seed<k>/metrics.json`` for ``seeds`` and write the summary (module doc).

    ``runs`` keeps those configurations (all by default; e.g. ``["triplet_semihard",
    "npair"]`` for a plot of just the two); ``reference`` is the configuration the paired
    differences are taken against (the first kept one by default). Files:
    ``out_dir/<name>.md``, ``.png`` and ``.json``.

    Raises:
        ValueError: no seeds, a seed given twice, an unknown run or reference name.
        FileNotFoundError: a seed's ``compare`` did not finish.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    everything = read_seed_runs(out, seeds)
    known = list(dict.fromkeys(r.name for r in everything))
    keep = known if runs is None else list(runs)
    unknown = [n for n in keep if n not in known]
    if unknown or not keep:
        raise ValueError(f"unknown run(s) {unknown or keep}: the seeds ran {known}")
    ref = keep[0] if reference is None else reference
    if ref not in known:
        raise ValueError(f"unknown reference {ref!r}: the seeds ran {known}")
    chosen = [r for r in everything if r.name in keep or r.name == ref]
    summaries = [s for s in _summaries(chosen, ref) if s.name in keep]
    header = [
        "# Loss comparison over seeds", "",
        f"Seeds {', '.join(map(str, seeds))} (folders `seed<k>/`, one `compare` each). "
        "Final numbers on all held-out pairs with flip test; ± is the sample standard "
        "deviation over seeds, not over folds. The paired difference is taken seed by seed "
        f"against {ref} (same batches at one seed when the data-order digests agree).",
    ]
    text = _markdown(summaries, ref, header, f"{name}.png")
    plot = plot_seed_bands([r for r in chosen if r.name in keep], out / f"{name}.png",
                           title=f"Convergence over seeds {', '.join(map(str, seeds))}")
    metrics = {
        "seeds": seeds, "reference": ref, "table_far": TABLE_FAR,
        "runs": [{
            "name": s.name, "loss": s.loss,
            **{k: {"mean": v.mean, "std": v.std, "values": list(v.values)}
               for k, v in s.final.items()},
            "wall_seconds": {"mean": s.wall_seconds.mean, "std": s.wall_seconds.std,
                             "values": list(s.wall_seconds.values)},
            "difference": None if s.difference is None else {
                "mean": s.difference.mean, "std": s.difference.std,
                "values": list(s.difference.values)},
            "ahead": s.ahead, "paired": s.paired,
        } for s in summaries],
    }
    metrics_json = atomic_write_text(
        out / f"{name}.json",
        json.dumps(_json_safe(metrics, "metrics"), indent=2, allow_nan=False) + "\n",
    )
    table = atomic_write_text(out / f"{name}.md", text)
    return SeedComparison(tuple(summaries), ref, table, plot, metrics_json, text)


def compare_seeds(
    configs: Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str],
    seeds: Sequence[int],
    reference: str | None = None,
    **compare_args: Any,
) -> SeedComparison:
    """``compare(configs, out_dir=out_dir/seed<k>, seed=k, **compare_args)`` for each seed,
    then :func:`summarize_seeds` over all of them (module docstring).

    Raises:
        ValueError: as ``compare`` and ``summarize_seeds``; ``seed`` among ``compare_args``.
    """
    if "seed" in compare_args:
        raise ValueError("give the seeds as seeds=[...], not seed=")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"give distinct seeds, got {seeds}")
    results = tuple(
        compare(configs, out_dir=seed_folder(out_dir, s), seed=s, **compare_args) for s in seeds
    )
    return replace(summarize_seeds(out_dir, seeds, reference=reference), per_seed=results)


__all__ = [
    "SeedComparison",
    "SeedRun",
    "SeedSummary",
    "Spread",
    "compare_seeds",
    "plot_seed_bands",
    "read_seed_runs",
    "seed_bands",
    "seed_folder",
    "summarize_seeds",
]
