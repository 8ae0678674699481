"""Knowledge-distillation losses for embeddings: a student learns a teacher's metric space.

Every loss here is called ``loss(student, teacher)``: ``student`` ``(B, Ds)`` the student's
embeddings (with gradient), ``teacher`` ``(B, Dt)`` the teacher's embeddings of the same
images (constants; :mod:`facemetric.distillation` caches them). Both are L2-normalised
inside — face embeddings are compared by cosine, so only directions matter. The
relational losses (RKD, similarity matrix) compare the two spaces through relations between
the batch's items, so ``Ds`` and ``Dt`` may differ; the embedding regression compares
vectors and, when the dimensions differ, learns a linear projection of the student
(``student_dim``/``teacher_dim``; the projection lives in the loss, is trained with it and
is *not* part of the exported student: at inference the student's own embedding is used,
and it is the relations the projection preserves up to a linear map).

:class:`DistillationObjective` adds them to a label loss (ArcFace ...):
``ℓ = w_label·ℓ_label(s, y) + Σ_k w_k·ℓ_k(s, t)``, called ``(student, labels, teacher)``.

A non-finite input raises ``ValueError`` (a NaN teacher row is a broken cache, not
something to train on).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EPS = 1e-12


def _check(student: Tensor, teacher: Tensor, what: str, min_batch: int = 1) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"{what}: student and teacher must be (B, D) matrices, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{what}: {student.shape[0]} student rows but {teacher.shape[0]} teacher rows; "
            "give the teacher's embedding of each image of the batch"
        )
    if student.shape[0] < min_batch:
        raise ValueError(f"{what} needs a batch of at least {min_batch}, got {student.shape[0]}")
    if not bool(torch.isfinite(student).all()) or not bool(torch.isfinite(teacher).all()):
        raise ValueError(f"{what}: the student or teacher embeddings hold NaN or Inf")


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x, dim=1, eps=_EPS)


class EmbeddingDistillationLoss(nn.Module):
    """Regression of the student's unit embedding onto the teacher's.

    ``cosine``: ``ℓ = mean_b (1 − ⟨ŝ_b, t̂_b⟩)``; ``l2``: ``ℓ = mean_b ‖ŝ_b − t̂_b‖²``, with
    ``x̂ = x/‖x‖`` (for unit vectors ``‖ŝ − t̂‖² = 2(1 − cos)``: the two differ by a factor
    2, kept for the weight conventions of both literatures). ``ŝ`` is the projected student
    ``normalise(P s)`` when ``student_dim != teacher_dim`` (``P`` a learned
    ``teacher_dim × student_dim`` linear map without bias), else ``normalise(s)``.
    The regression ("hint") form of knowledge distillation, applied to the final embedding
    (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets",
    ICLR 2015).
    """

    def __init__(
        self, kind: str = "cosine", student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("cosine", "l2"):
            raise ValueError(f"EmbeddingDistillationLoss: kind must be 'cosine' or 'l2', got "
                             f"{kind!r}")
        if (student_dim is None) != (teacher_dim is None):
            raise ValueError("EmbeddingDistillationLoss: give both student_dim and "
                             "teacher_dim (for a projection) or neither")
        self.kind = kind
        self.projection: nn.Linear | None = None
        if student_dim is not None and teacher_dim is not None:
            if student_dim < 1 or teacher_dim < 1:
                raise ValueError("EmbeddingDistillationLoss: dimensions must be positive")
            if student_dim != teacher_dim:
                self.projection = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check(student, teacher, type(self).__name__)
        s = student if self.projection is None else self.projection(student)
        if s.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"EmbeddingDistillationLoss: student dimension {student.shape[1]} != teacher "
                f"{teacher.shape[1]}: set student_dim and teacher_dim for a learned projection, "
                "or use a relational loss (RKD, similarity matrix)"
            )
        cos = (_unit(s) * _unit(teacher.to(s.dtype))).sum(dim=1)
        return (1 - cos).mean() if self.kind == "cosine" else (2 - 2 * cos).mean()

    def extra_repr(self) -> str:
        proj = "" if self.projection is None else (
            f", projection={self.projection.in_features}→{self.projection.out_features}")
        return f"kind={self.kind!r}{proj}"


def _pair_distances(x: Tensor) -> Tensor:
    """``(B, B)`` Euclidean distances, with a gradient that stays finite on the diagonal."""
    sq = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(dim=2)
    return sq.clamp_min(_EPS).sqrt()


def _huber(a: Tensor, b: Tensor, delta: float) -> Tensor:
    return F.smooth_l1_loss(a, b, reduction="none", beta=delta)


class RKDDistanceLoss(nn.Module):
    """Relational KD, distance-wise: the students' pairwise distances, each divided by their
    batch mean, match the teacher's.

    ``ψ(x_i, x_j) = ‖x̂_i − x̂_j‖ / μ``, ``μ = mean_{i≠j} ‖x̂_i − x̂_j‖``;
    ``ℓ = mean_{i≠j} huber_δ(ψ_s(i, j) − ψ_t(i, j))`` with ``huber_δ(e) = ½e²/δ`` for
    ``|e| < δ`` else ``|e| − ½δ`` (smooth L1, ``δ = 1`` in the paper). Memory O(B²·D).
    Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019 (eq. 5–6).
    """

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(delta) or delta <= 0:
            raise ValueError(f"RKDDistanceLoss: delta must be > 0, got {delta}")
        self.delta = float(delta)

    @staticmethod
    def potential(x: Tensor) -> Tensor:
        """``(B, B)`` mean-normalised distances of the unit rows of ``x`` (diagonal 0)."""
        d = _pair_distances(_unit(x))
        off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        d = d * off
        return d / d[off].mean().clamp_min(_EPS)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check(student, teacher, type(self).__name__, min_batch=2)
        off = ~torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
        ps = self.potential(student)
        with torch.no_grad():
            pt = self.potential(teacher.to(student.dtype))
        return _huber(ps[off], pt[off], self.delta).mean()

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


class RKDAngleLoss(nn.Module):
    """Relational KD, angle-wise: the cosine of the angle each triplet makes at its middle
    item matches the teacher's.

    ``ψ(x_i, x_j, x_k) = ⟨e_ij, e_kj⟩``, ``e_ij = (x̂_i − x̂_j)/‖x̂_i − x̂_j‖``;
    ``ℓ = mean over distinct (i, j, k) of huber_δ(ψ_s − ψ_t)`` (as :class:`RKDDistanceLoss`).
    Every triplet of the batch is used, vectorised: memory O(B³ + B²·D) (B = 128: 2.1 M
    angles, 8 MiB per float32 tensor). Park, Kim, Lu, Cho, "Relational Knowledge
    Distillation", CVPR 2019 (eq. 7–8).
    """

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(delta) or delta <= 0:
            raise ValueError(f"RKDAngleLoss: delta must be > 0, got {delta}")
        self.delta = float(delta)

    @staticmethod
    def potential(x: Tensor) -> Tensor:
        """``(B, B, B)``: entry ``[j, i, k] = ⟨e_ij, e_kj⟩`` (0 where ``i = j`` or
        ``k = j``)."""
        u = _unit(x)
        diff = u.unsqueeze(0) - u.unsqueeze(1)  # [j, i] = x_i − x_j
        norm = diff.pow(2).sum(dim=2, keepdim=True).clamp_min(_EPS).sqrt()
        e = diff / norm
        return torch.bmm(e, e.transpose(1, 2))

    @staticmethod
    def _distinct(b: int, device: torch.device) -> Tensor:
        r = torch.arange(b, device=device)
        j, i, k = r.view(b, 1, 1), r.view(1, b, 1), r.view(1, 1, b)
        return (i != j) & (k != j) & (i != k)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check(student, teacher, type(self).__name__, min_batch=3)
        mask = self._distinct(student.shape[0], student.device)
        ps = self.potential(student)
        with torch.no_grad():
            pt = self.potential(teacher.to(student.dtype))
        return _huber(ps[mask], pt[mask], self.delta).mean()

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


class SimilarityMatrixLoss(nn.Module):
    """The batch's cosine-similarity matrix of the student matches the teacher's.

    ``S = X̂ X̂ᵀ`` (``X̂`` the unit rows), ``ℓ = ‖S_s − S_t‖²_F / (B(B − 1))`` — the mean
    squared difference over the off-diagonal entries (the diagonal is 1 in both). The
    similarity-preserving loss of Tung & Mori ("Similarity-Preserving Knowledge
    Distillation", ICCV 2019) with the pairwise cosines of the final embeddings as the
    similarity (their ``G = row-normalise(A Aᵀ)`` of activation maps becomes the cosine
    matrix for unit embeddings, and the mean over entries replaces their ``1/B²`` sum).
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check(student, teacher, type(self).__name__, min_batch=2)
        s = _unit(student)
        t = _unit(teacher.to(student.dtype))
        b = s.shape[0]
        diff = s @ s.T - t @ t.T
        return diff.pow(2).sum() / (b * (b - 1))


class DistillationObjective(nn.Module):
    """A label loss plus weighted distillation terms, called ``(student, labels, teacher)``.

    ``ℓ = w_label·ℓ_label(s, y) + Σ_k w_k·ℓ_k(s, t)``; a term or the label loss with weight
    0 is not computed. ``label_loss`` may be ``None`` (pure distillation). Terms are
    modules of this file (or any ``(student, teacher) → scalar`` module); their parameters
    (a projection) and the label loss's (class centres) are this module's parameters, so
    the optimiser and checkpoints see them.

    ``last`` holds the detached value of each part of the latest call, a 0-d tensor on the
    loss's device (for logging; the training loop reads them with the loss in one transfer).
    """

    def __init__(
        self,
        label_loss: nn.Module | None,
        terms: Mapping[str, tuple[float, nn.Module]],
        label_weight: float = 1.0,
    ) -> None:
        super().__init__()
        weights = {"label": float(label_weight), **{k: float(w) for k, (w, _) in terms.items()}}
        for name, w in weights.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"DistillationObjective: weight of {name!r} must be >= 0, "
                                 f"got {w}")
        if label_loss is None and label_weight > 0 and not terms:
            raise ValueError("DistillationObjective: nothing to optimise")
        if (label_loss is None or label_weight == 0) and not any(w > 0 for w, _ in
                                                                 terms.values()):
            raise ValueError("DistillationObjective: every weight is 0")
        self.label_loss = label_loss
        self.label_weight = float(label_weight)
        self.terms = nn.ModuleDict({k: m for k, (_, m) in terms.items()})
        self.weights = {k: float(w) for k, (w, _) in terms.items()}
        self.last: dict[str, Tensor] = {}

    def forward(self, student: Tensor, labels: Tensor, teacher: Tensor) -> Tensor:
        total = student.new_zeros(())
        last: dict[str, Tensor] = {}
        if self.label_loss is not None and self.label_weight > 0:
            value = self.label_loss(student, labels)
            last["label"] = value.detach()
            total = total + self.label_weight * value
        for name, term in self.terms.items():
            w = self.weights[name]
            if w > 0:
                value = term(student, teacher)
                last[name] = value.detach()
                total = total + w * value
        self.last = last
        return total

    def extra_repr(self) -> str:
        parts = [f"label×{self.label_weight:g}"] + [f"{k}×{w:g}" for k, w in
                                                     self.weights.items()]
        return " + ".join(parts)


__all__ = [
    "DistillationObjective",
    "EmbeddingDistillationLoss",
    "RKDAngleLoss",
    "RKDDistanceLoss",
    "SimilarityMatrixLoss",
]
