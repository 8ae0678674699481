"""Verification reports people read: ``report.md``, ``metrics.json`` and the figures.

``write_verification_report`` writes into ``out_dir``:

- ``roc.png`` (TAR vs log FAR), ``scores.png`` (pair-score histograms with the mean k-fold
  threshold) and, given a CMC, ``cmc.png`` — see ``plots``;
- ``metrics.json``: every number of the report, strict JSON (no ``NaN``/``Infinity``: a
  non-finite number — a ±inf fold threshold meaning "accept/reject every pair", an
  unresolvable TAR@FAR — is ``null``; numpy scalars and arrays become Python numbers and
  lists; FAR keys are ``str(float)``, e.g. ``"0.001"``);
- ``report.md``: a markdown summary linking the PNGs.

Every file is written atomically (temporary file in ``out_dir``, then ``os.replace``), and
``report.md`` last: if it exists, the files it links to are complete. All inputs, including
``extra``, are checked before anything is written.

``comparison_table`` puts several reports side by side (models × datasets).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.atomic import atomic_write_text
from facemetric.evaluation.identification import CMCCurve
from facemetric.evaluation.plots import plot_cmc, plot_roc, plot_score_histograms
from facemetric.evaluation.verification import (
    VerificationReport,
    check_pairs,
    verification_report,
)

# CMC ranks stored in metrics.json (the full curve has one entry per gallery identity).
MAX_JSON_CMC_RANKS = 1000
_CMC_TABLE_RANKS = (1, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by ``write_verification_report`` (``cmc_png`` is ``None`` without CMC)."""

    out_dir: Path
    markdown: Path
    metrics_json: Path
    roc_png: Path
    scores_png: Path
    cmc_png: Path | None


def _json_safe(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON types: non-finite floats → ``None``, numpy → Python, tuples
    and arrays → lists, ``Path`` → ``str``, mapping keys → ``str``. Anything else raises
    ``TypeError`` naming where it was found."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        return _json_safe(value.item(), where)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value.tolist())]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where} is a {type(value).__name__}, which cannot be written as JSON")


def _far_label(far: float) -> str:
    return f"{far:.0e}" if far < 0.01 else f"{far:g}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100.0 * x:.2f}%"


def _num(x: float | None, digits: int = 4) -> str:
    if x is None or math.isnan(x):
        return "—"
    if math.isinf(x):
        return "+∞ (reject all)" if x > 0 else "−∞ (accept all)"
    return f"{x:.{digits}f}"


def _cell(text: Any) -> str:
    """Markdown table cell: pipes escaped, line breaks flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _accuracy_text(report: VerificationReport) -> str:
    return f"{100.0 * report.accuracy:.2f}% ± {100.0 * report.accuracy_std:.2f}%"


def _tar_text(report: VerificationReport, far: float) -> str:
    tar = report.tar_at_far[far]
    if tar is None:
        return f"unresolvable ({report.num_negatives} negatives)"
    return _pct(tar)


def _mean_threshold(report: VerificationReport) -> float | None:
    """Mean of the finite k-fold thresholds (``None`` if every fold accepted/rejected all)."""
    finite = report.thresholds[np.isfinite(report.thresholds)]
    return float(finite.mean()) if finite.size else None


def _detail(key: str, value: Any) -> str:
    safe = _json_safe(value, key)
    return safe if isinstance(safe, str) else json.dumps(safe, ensure_ascii=False)


def _flatten(extra: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in extra.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flatten(value, f"{name}.")
        else:
            out.append((name, value))
    return out


def _metrics(
    name: str,
    report: VerificationReport,
    cmc: CMCCurve | None,
    extra: Mapping[str, Any] | None,
    files: Mapping[str, str],
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "num_pairs": report.num_positives + report.num_negatives,
        "num_positives": report.num_positives,
        "num_negatives": report.num_negatives,
        "num_folds": len(report.fold_accuracies),
        "accuracy": report.accuracy,
        "accuracy_std": report.accuracy_std,
        "accuracy_sem": report.accuracy_sem,
        "fold_accuracies": report.fold_accuracies,
        "thresholds": report.thresholds,
        "mean_threshold": _mean_threshold(report),
        "auc": report.auc,
        "eer": report.eer,
        "eer_threshold": report.eer_threshold,
        "far_resolution": 1.0 / report.num_negatives,
        "tar_at_far": report.tar_at_far,
        "threshold_at_far": report.threshold_at_far,
        "unresolvable_fars": report.unresolvable_fars,
    }
    if cmc is not None:
        data["cmc"] = {
            "num_probes": int(cmc.probe_ranks.shape[0]),
            "num_identities": int(cmc.curve.shape[0]),
            "rank1": cmc.rank1,
            "rank5": cmc.rank5,
            "rank10": cmc.rank10,
            "curve": cmc.curve[:MAX_JSON_CMC_RANKS],
        }
    data["extra"] = dict(extra) if extra is not None else {}
    data["files"] = dict(files)
    return _json_safe(data, "metrics")


def _markdown(
    name: str,
    report: VerificationReport,
    cmc: CMCCurve | None,
    extra: Mapping[str, Any] | None,
    files: Mapping[str, str],
) -> str:
    k = len(report.fold_accuracies)
    lines = [
        f"# {name}",
        "",
        f"{report.num_positives} same-identity and {report.num_negatives} different-identity "
        f"pairs; accuracy over {k} folds (threshold chosen on the other folds; ± is the "
        "sample standard deviation across folds, standard error "
        f"{100 * report.accuracy_sem:.2f}%).",
        "",
    ]
    rows: list[list[str]] = [
        ["Accuracy", _accuracy_text(report)],
        ["AUC", f"{report.auc:.5f}"],
        ["EER", f"{_pct(report.eer)} (threshold {_num(report.eer_threshold)})"],
    ]
    for far in report.tar_at_far:
        text = _tar_text(report, far)
        if report.tar_at_far[far] is not None:
            text += f" (threshold {_num(report.threshold_at_far[far])})"
        rows.append([f"TAR@FAR={_far_label(far)}", text])
    lines += _table(["Metric", "Value"], rows)
    if report.unresolvable_fars:
        lines += [
            "",
            f"With {report.num_negatives} negative pairs the smallest measurable FAR is "
            f"1/{report.num_negatives} = {1.0 / report.num_negatives:.2e}; TAR at "
            + ", ".join(_far_label(f) for f in report.unresolvable_fars)
            + " cannot be estimated.",
        ]
    lines += ["", "## Thresholds per fold", ""]
    fold_rows = [
        [str(i + 1), _num(float(t)), _pct(float(a))]
        for i, (t, a) in enumerate(zip(report.thresholds, report.fold_accuracies, strict=True))
    ]
    lines += _table(["Fold", "Threshold", "Held-out accuracy"], fold_rows)
    lines += ["", f"Mean finite threshold: {_num(_mean_threshold(report))}"]
    if cmc is not None:
        lines += ["", "## Identification (closed-set CMC)", ""]
        num_ids = cmc.curve.shape[0]
        ranks = [r for r in _CMC_TABLE_RANKS if r <= num_ids] or [num_ids]
        lines += _table(["Rank", "Identification rate"], [[str(r), _pct(cmc.at(r))] for r in ranks])
        lines += ["", f"{cmc.probe_ranks.shape[0]} probes, {num_ids} gallery identities."]
    if extra:
        lines += ["", "## Details", ""]
        lines += _table(["Key", "Value"], [(key, _detail(key, v)) for key, v in _flatten(extra)])
    lines += ["", "## Figures", ""]
    captions = {"roc": "ROC (TAR vs FAR)", "scores": "Pair score histograms", "cmc": "CMC"}
    for key, file in files.items():
        lines += [f"[{file}]({file})", "", f"![{captions[key]}]({file})", ""]
    return "\n".join(lines)


def write_verification_report(
    out_dir: str | os.PathLike[str],
    name: str,
    scores: Any,
    is_same: Any,
    report: VerificationReport | None = None,
    *,
    folds: int | Any = 10,
    extra: Mapping[str, Any] | None = None,
    cmc: CMCCurve | None = None,
) -> ReportFiles:
    """Write ``report.md``, ``metrics.json``, ``roc.png``, ``scores.png`` (and ``cmc.png``).

    Args:
        out_dir: directory to write into (created if missing; files of these names are
            replaced).
        name: title of the report, e.g. ``"LFW View 2 — iresnet50"``.
        scores, is_same: the ``(n,)`` pair scores (higher = same) and labels.
        report: ``verification_report(scores, is_same, folds)`` if already computed (its
            pair counts must match ``is_same``); computed here otherwise.
        folds: passed to ``verification_report`` when ``report`` is ``None``.
        extra: free-form details (model, checkpoint, dataset...) stored under ``"extra"``
            in the JSON and listed in the markdown; must be JSON-able (see ``_json_safe``).
        cmc: a closed-set CMC to add (table, ``cmc.png``, ``"cmc"`` in the JSON).
    """
    s, y = check_pairs(scores, is_same)
    if report is None:
        report = verification_report(s, y, folds)
    elif (report.num_positives, report.num_negatives) != (int(y.sum()), int((~y).sum())):
        raise ValueError(
            f"report has {report.num_positives} positive and {report.num_negatives} negative "
            f"pairs but is_same has {int(y.sum())} and {int((~y).sum())}: not the same pairs"
        )
    out = Path(out_dir)
    files = {"roc": "roc.png", "scores": "scores.png"}
    if cmc is not None:
        files["cmc"] = "cmc.png"
    # Build (and so validate) both texts before touching the disk.
    metrics_text = json.dumps(
        _metrics(name, report, cmc, extra, files), indent=2, allow_nan=False, ensure_ascii=False
    )
    markdown_text = _markdown(name, report, cmc, extra, files)

    out.mkdir(parents=True, exist_ok=True)
    roc_png = plot_roc({name: report}, out / files["roc"], title=f"{name}: ROC")
    scores_png = plot_score_histograms(
        s, y, _mean_threshold(report), out / files["scores"], title=f"{name}: pair scores"
    )
    cmc_png = None
    if cmc is not None:
        cmc_png = plot_cmc({name: cmc}, out / files["cmc"], title=f"{name}: CMC")
    metrics_json = atomic_write_text(out / "metrics.json", metrics_text + "\n")
    markdown = atomic_write_text(out / "report.md", markdown_text + "\n")
    return ReportFiles(out, markdown, metrics_json, roc_png, scores_png, cmc_png)


def _metric_cell(report: VerificationReport | None, metric: str | float) -> str:
    if report is None:
        return "—"
    if metric == "accuracy":
        return _accuracy_text(report)
    if metric == "auc":
        return f"{report.auc:.5f}"
    if metric == "eer":
        return _pct(report.eer)
    far = float(metric)
    if far not in report.tar_at_far:
        return "—"
    return _tar_text(report, far)


def _metric_name(metric: str | float) -> str:
    names = {"accuracy": "accuracy", "auc": "AUC", "eer": "EER"}
    return names[metric] if isinstance(metric, str) else f"TAR@FAR={_far_label(float(metric))}"


def comparison_table(
    rows: Mapping[str, VerificationReport] | Mapping[str, Mapping[str, VerificationReport]],
    metric: str | float = "accuracy",
) -> str:
    """Markdown table comparing reports.

    - ``{name: report}``: one row per name; columns pairs, accuracy ± std, AUC, EER and
      TAR@FAR at every target any report has (``unresolvable (N negatives)`` where a
      report's N cannot resolve it, ``—`` where it was not measured).
    - ``{row: {column: report}}``, e.g. ``{"iresnet50": {"LFW DevTest": r1, "CFP-FP": r2}}``:
      one row per model, one column per dataset (first-seen order), each cell ``metric``:
      ``"accuracy"`` (± std), ``"auc"``, ``"eer"`` or a float FAR for TAR at that FAR;
      ``—`` where a row lacks a column.
    """
    if not rows:
        raise ValueError("comparison_table needs at least one row")
    if isinstance(metric, str) and metric not in ("accuracy", "auc", "eer"):
        raise ValueError(f"metric must be 'accuracy', 'auc', 'eer' or a FAR, got {metric!r}")
    values = list(rows.values())
    if all(isinstance(v, VerificationReport) for v in values):
        fars = sorted({f for r in values for f in r.tar_at_far})
        header = ["", "pairs", "accuracy", "AUC", "EER"]
        header += [f"TAR@FAR={_far_label(f)}" for f in fars]
        body = [
            [
                name,
                f"{r.num_positives} + {r.num_negatives}",
                _accuracy_text(r),
                f"{r.auc:.5f}",
                _pct(r.eer),
                *(_metric_cell(r, f) for f in fars),
            ]
            for name, r in rows.items()
        ]
        return "\n".join(_table(header, body)) + "\n"
    if not all(isinstance(v, Mapping) for v in values):
        raise TypeError("rows must all be VerificationReports or all be mappings of them")
    columns: list[str] = []
    for row in values:
        for col, report in row.items():
            if not isinstance(report, VerificationReport):
                raise TypeError(f"cell {col!r} is a {type(report).__name__}")
            if col not in columns:
                columns.append(col)
    body = [
        [name, *(_metric_cell(row.get(c), metric) for c in columns)] for name, row in rows.items()
    ]
    return "\n".join(_table([_metric_name(metric), *columns], body)) + "\n"


__all__ = [
    "ReportFiles",
    "comparison_table",
    "write_verification_report",
]
