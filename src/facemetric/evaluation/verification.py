"""Face verification (1:1) from scored pairs: k-fold accuracy, ROC, AUC, EER, TAR@FAR.

Conventions
-----------
- ``scores`` are similarities: higher means "same identity". Turn distances into scores with
  ``scores_from_distances`` (negation) or score embedding pairs with ``cosine_pair_scores``.
- A threshold ``τ`` accepts a pair as "same" when ``score ≥ τ`` — in the ROC, the k-fold
  accuracy and the TAR@FAR operating points alike.

k-fold accuracy (LFW View 2's protocol, Huang et al. 2007)
------------------------------------------------------------
For each fold ``f`` the threshold is chosen on the other ``k − 1`` folds by maximising the
accuracy over the candidate thresholds and then applied to fold ``f``. The candidates are the
midpoints between consecutive *distinct* training scores, plus ``−inf`` (accept every pair)
and ``+inf`` (reject every pair). Tied scores are one distinct value, so no threshold ever
separates them. When several candidates reach the same (maximal) training accuracy the
*smallest* one is taken. The reported ``accuracy`` is the mean of the ``k`` held-out fold
accuracies; ``accuracy_std`` is their sample standard deviation (``ddof=1``, LFW's σ̂) and
``accuracy_sem = accuracy_std / √k`` the standard error LFW asks for. (Code that uses
``np.std``'s default ``ddof=0`` reports a spread smaller by ``√((k − 1)/k)``.)

Folds are either given explicitly (one fold id per pair, e.g. ``PairList.fold`` from
``protocols``: the contiguous 300 + 300 blocks of LFW's ``pairs.txt``) or as an ``int`` k:
then pair ``i`` goes to fold ``i mod k`` (interleaved), which is what ``pairsDev*.txt`` need
because they list every matched pair before every mismatched one.

Cost: one sort of the scores, then ``O(n)`` cumulative sums per fold.

ROC, AUC, EER, TAR@FAR
----------------------
The ROC has one point per distinct score (ties form one step, so the AUC counts a tied
positive/negative pair as half a correct ordering — the Mann–Whitney statistic), starting at
``(0, 0)`` with threshold ``+inf``. The AUC is the trapezoidal area. The EER is where the
false-accept rate equals the false-reject rate ``1 − TAR``, linearly interpolated along the
ROC polyline. ``TAR@FAR=f`` is the largest TAR of an ROC point whose empirical FAR ≤ ``f``
(no interpolation). With ``N`` negatives the smallest non-zero FAR is ``1/N``: targets below
it cannot be resolved and are reported as ``None`` (and listed in ``unresolvable_fars``)
instead of a number that would only say "FAR = 0 here".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facemetric.evaluation._arrays import (
    check_bool_labels,
    check_embeddings,
    check_scores,
    normalize_rows,
    to_numpy,
)

DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# Relative slack when comparing an empirical rate (count / total) to a target rate, so that
# e.g. 3 / 3000 counts as ≤ 1e-3 despite floating-point rounding.
_RATE_RTOL = 1e-9


def check_pairs(scores: Any, is_same: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(scores float64 (n,), is_same bool (n,))``; ``n`` must be ≥ 1."""
    s = check_scores(scores)
    if s.size == 0:
        raise ValueError("no pairs: scores is empty")
    return s, check_bool_labels(is_same, s.shape[0])


def cosine_pair_scores(a: Any, b: Any) -> np.ndarray:
    """Cosine similarity of aligned rows, ``(n, d), (n, d) -> (n,)`` float64.

    Rows of (near) zero norm have cosine 0 to everything.
    """
    ta = check_embeddings(a, "a").double()
    tb = check_embeddings(b, "b").double()
    if ta.shape != tb.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}"
        )
    return (normalize_rows(ta) * normalize_rows(tb)).sum(dim=1).numpy()


def scores_from_distances(distances: Any) -> np.ndarray:
    """Similarity scores from distances (smaller = closer): ``score = −distance``."""
    return -check_scores(distances, "distances")


def interleaved_folds(num_pairs: int, num_folds: int) -> np.ndarray:
    """Fold ids ``i mod num_folds`` for ``i = 0..num_pairs−1`` (``int64``)."""
    if num_folds < 2:
        raise ValueError(f"num_folds must be ≥ 2, got {num_folds}")
    if num_pairs < num_folds:
        raise ValueError(f"{num_pairs} pairs cannot fill {num_folds} folds")
    return np.arange(num_pairs, dtype=np.int64) % num_folds


def _resolve_folds(folds: int | Any, n: int) -> np.ndarray:
    if isinstance(folds, (int, np.integer)):
        return interleaved_folds(n, int(folds))
    arr = to_numpy(folds)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"folds must be an int or have shape ({n},), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"fold ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class KFoldAccuracy:
    """Result of ``kfold_accuracy``; arrays are indexed like ``fold_ids``."""

    accuracy: float
    accuracy_std: float
    accuracy_sem: float
    fold_accuracies: np.ndarray
    thresholds: np.ndarray
    fold_ids: np.ndarray


def kfold_accuracy(scores: Any, is_same: Any, folds: int | Any = 10) -> KFoldAccuracy:
    """k-fold verification accuracy with the threshold chosen on the other folds.

    Args:
        scores: ``(n,)`` similarities (higher = same).
        is_same: ``(n,)`` booleans.
        folds: number of interleaved folds (pair ``i`` in fold ``i mod k``) or ``(n,)``
            integer fold ids (any values; each distinct value is one fold, in sorted order).

    Returns:
        ``KFoldAccuracy``: mean, sample std (ddof=1) and standard error of the held-out fold
        accuracies, each fold's accuracy and chosen threshold (``±inf`` when accepting or
        rejecting every training pair is best). See the module docstring for the rule.
    """
    s, y = check_pairs(scores, is_same)
    n = s.shape[0]
    fold = _resolve_folds(folds, n)
    fold_ids, fold_of = np.unique(fold, return_inverse=True)
    fold_of = fold_of.reshape(-1)
    k = fold_ids.shape[0]
    if k < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 folds, got {k}")

    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted, f_sorted = s[order], y[order], fold_of[order]
    # Position i ends a group of equal scores: a candidate cut lies after it.
    group_end = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])

    thresholds = np.empty(k)
    accuracies = np.empty(k)
    for f in range(k):
        train = f_sorted != f
        pos_le = np.cumsum(y_sorted & train)  # training positives with score ≤ s_sorted[i]
        neg_le = np.cumsum(~y_sorted & train)
        num_pos, num_train = int(pos_le[-1]), int(pos_le[-1] + neg_le[-1])
        # Correct training decisions for the cut before everything, then after each group:
        # positives above the cut are accepted, negatives at or below it are rejected.
        correct = np.r_[num_pos, num_pos - pos_le[group_end] + neg_le[group_end]]
        best = int(np.argmax(correct))  # first maximum = smallest threshold
        if best == 0:
            tau = -np.inf
        else:
            train_scores = s_sorted[train]
            below = int(pos_le[group_end[best - 1]] + neg_le[group_end[best - 1]])
            if below == 0:
                tau = -np.inf
            elif below == num_train:
                tau = np.inf
            else:
                lo, hi = train_scores[below - 1], train_scores[below]
                tau = 0.5 * lo + 0.5 * hi
                if not lo < tau <= hi:  # lo and hi adjacent floats: hi still separates them
                    tau = hi
        test = fold_of == f
        thresholds[f] = tau
        accuracies[f] = np.mean((s[test] >= tau) == y[test])

    std = float(np.std(accuracies, ddof=1))
    return KFoldAccuracy(
        accuracy=float(np.mean(accuracies)),
        accuracy_std=std,
        accuracy_sem=std / np.sqrt(k),
        fold_accuracies=accuracies,
        thresholds=thresholds,
        fold_ids=fold_ids,
    )


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class RocCurve:
    """ROC points in order of decreasing threshold: ``far[0] = tar[0] = 0`` at ``+inf``.

    ``far[i]``/``tar[i]`` are the fractions of negatives/positives with ``score ≥
    thresholds[i]``; ``num_negatives``/``num_positives`` give the resolution of each axis.
    """

    far: np.ndarray
    tar: np.ndarray
    thresholds: np.ndarray
    num_positives: int
    num_negatives: int


def roc_curve(scores: Any, is_same: Any) -> RocCurve:
    """ROC with one point per distinct score; needs at least one positive and one negative."""
    s, y = check_pairs(scores, is_same)
    num_pos = int(y.sum())
    num_neg = int(y.size - num_pos)
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"a ROC needs both classes, got {num_pos} positive and {num_neg} negative pairs"
        )
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    group_end = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(y_sorted)[group_end]
    fp = (group_end + 1) - tp
    return RocCurve(
        far=np.r_[0.0, fp / num_neg],
        tar=np.r_[0.0, tp / num_pos],
        thresholds=np.r_[np.inf, s_sorted[group_end]],
        num_positives=num_pos,
        num_negatives=num_neg,
    )


def roc_auc(roc: RocCurve) -> float:
    """Area under the ROC (trapezoidal; ties count half — the Mann–Whitney U / (P·N))."""
    return float(np.sum(np.diff(roc.far) * (roc.tar[1:] + roc.tar[:-1]) * 0.5))


def equal_error_rate(roc: RocCurve) -> tuple[float, float]:
    """``(eer, threshold)`` where FAR = FRR = 1 − TAR, interpolated along the ROC polyline.

    ``g = FAR + TAR − 1`` rises from −1 to +1 along the curve; the EER is FAR where ``g``
    crosses 0 (linear between the two ROC points around the crossing), and the threshold is
    interpolated between theirs in the same proportion (the lower point's when the upper one
    is the ``+inf`` start).
    """
    g = roc.far + roc.tar - 1.0
    i = int(np.argmax(g >= 0.0))  # g[-1] = 1, so a crossing exists
    if g[i] == 0.0 or i == 0:
        return float(roc.far[i]), float(roc.thresholds[i])
    t = -g[i - 1] / (g[i] - g[i - 1])
    eer = roc.far[i - 1] + t * (roc.far[i] - roc.far[i - 1])
    th_hi, th_lo = roc.thresholds[i - 1], roc.thresholds[i]
    threshold = th_lo if np.isinf(th_hi) else th_hi + t * (th_lo - th_hi)
    return float(eer), float(threshold)


def tar_at_far(
    roc: RocCurve, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS
) -> tuple[dict[float, float | None], dict[float, float | None], tuple[float, ...]]:
    """TAR at each target FAR: ``(tar, threshold, unresolvable_targets)``.

    For a target ``f`` the operating point is the ROC point with the largest TAR among those
    with FAR ≤ ``f``. Targets below ``1 / num_negatives`` map to ``None`` in both dicts and
    are listed in ``unresolvable_targets``.
    """
    tars: dict[float, float | None] = {}
    ths: dict[float, float | None] = {}
    unresolvable: list[float] = []
    for target in far_targets:
        f = float(target)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"FAR targets must lie in (0, 1], got {f}")
        if f * roc.num_negatives < 1.0 - _RATE_RTOL:
            tars[f] = ths[f] = None
            unresolvable.append(f)
            continue
        i = int(np.searchsorted(roc.far, f * (1.0 + _RATE_RTOL), side="right")) - 1
        tars[f] = float(roc.tar[i])
        ths[f] = float(roc.thresholds[i])
    return tars, ths, tuple(unresolvable)


def _format_rate(x: float) -> str:
    return f"{x:.0e}" if x < 0.01 else f"{x:g}"


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class VerificationReport:
    """Everything ``verification_report`` measures; ``str(report)`` prints a summary."""

    accuracy: float
    accuracy_std: float
    accuracy_sem: float
    thresholds: np.ndarray
    fold_accuracies: np.ndarray
    auc: float
    eer: float
    eer_threshold: float
    tar_at_far: dict[float, float | None]
    threshold_at_far: dict[float, float | None]
    unresolvable_fars: tuple[float, ...]
    num_positives: int
    num_negatives: int
    roc: RocCurve = field(repr=False)

    def __str__(self) -> str:
        lines = [
            f"pairs: {self.num_positives} same + {self.num_negatives} different",
            f"accuracy: {100 * self.accuracy:.2f}% ± {100 * self.accuracy_std:.2f}% "
            f"({len(self.fold_accuracies)} folds; SE {100 * self.accuracy_sem:.2f}%)",
            f"AUC: {self.auc:.5f}   EER: {100 * self.eer:.2f}%",
        ]
        for far, tar in self.tar_at_far.items():
            if tar is None:
                lines.append(
                    f"TAR@FAR={_format_rate(far)}: unresolvable "
                    f"(needs ≥ {int(np.ceil(1 / far - _RATE_RTOL))} negatives)"
                )
            else:
                lines.append(f"TAR@FAR={_format_rate(far)}: {100 * tar:.2f}%")
        return "\n".join(lines)


def verification_report(
    scores: Any,
    is_same: Any,
    folds: int | Any = 10,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
) -> VerificationReport:
    """k-fold accuracy, ROC, AUC, EER and TAR@FAR of scored pairs.

    Args:
        scores: ``(n,)`` similarity scores (higher = same identity).
        is_same: ``(n,)`` booleans: whether pair ``i`` shows one identity.
        folds: ``int`` k for interleaved folds (pair ``i`` in fold ``i mod k``) or ``(n,)``
            fold ids (``PairList.fold`` for LFW View 2's official contiguous folds).
        far_targets: FARs at which to report the TAR.

    Returns:
        ``VerificationReport``; its ``tar_at_far`` maps each target to a TAR or to ``None``
        when the number of negatives cannot resolve that FAR.
    """
    s, y = check_pairs(scores, is_same)
    kfold = kfold_accuracy(s, y, folds)
    roc = roc_curve(s, y)
    eer, eer_threshold = equal_error_rate(roc)
    tars, ths, unresolvable = tar_at_far(roc, far_targets)
    return VerificationReport(
        accuracy=kfold.accuracy,
        accuracy_std=kfold.accuracy_std,
        accuracy_sem=kfold.accuracy_sem,
        thresholds=kfold.thresholds,
        fold_accuracies=kfold.fold_accuracies,
        auc=roc_auc(roc),
        eer=eer,
        eer_threshold=eer_threshold,
        tar_at_far=tars,
        threshold_at_far=ths,
        unresolvable_fars=unresolvable,
        num_positives=roc.num_positives,
        num_negatives=roc.num_negatives,
        roc=roc,
    )
