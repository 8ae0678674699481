"""The training loop's side of knowledge distillation (``[distill]``; ``facemetric distill``).

:func:`attach_teacher` turns the training dataset into one whose items carry the teacher's
embedding: ``(image, label, teacher_row)``. The rows come from the teacher cache
(:func:`facemetric.distillation.teacher_cache`: built on first use, loaded afterwards, rebuilt
when the images or the teacher changed). :func:`build_objective` wraps the ``[loss]`` label
loss into a :class:`~facemetric.losses.distillation.DistillationObjective`, which the loop
calls as ``loss(student, labels, teacher)`` — the loop itself only forwards whatever extra
fields the dataset's items carry.

A flipped training image keeps its unflipped teacher row (the cache's docstring gives the
measured cost of that choice); every other augmentation keeps the identity's geometry too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from facemetric.distillation import (
    AlignedFaces,
    RealignedFaces,
    TeacherEmbeddings,
    TeacherInputs,
    teacher_cache,
)
from facemetric.losses.distillation import (
    DistillationObjective,
    EmbeddingDistillationLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
    SimilarityMatrixLoss,
)
from facemetric.training.config import DistillConfig, TrainConfig

ALIGN_REPORT = "align_report.json"
"""The report ``facemetric align`` writes into the aligned folder (its ``src`` and
``settings`` say how the faces were made)."""


_DELEGATED = frozenset({"targets", "num_classes", "classes", "samples", "failures", "root"})


class TeacherTargets(Dataset):
    """``base[i]`` plus the teacher's embedding of that image: ``(image, label, row)``.

    ``rows[i]`` belongs to ``base.samples[i]``; ``targets``, ``num_classes``, ``classes``,
    ``samples`` and ``failures`` are the base's (the base must not drop samples after this:
    verify it first).
    """

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        if len(rows) != len(base):
            raise ValueError(f"{len(rows)} teacher rows for {len(base)} images")
        self.base = base
        self.rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int, Tensor]:
        image, label = self.base[index]
        return image, label, self.rows[index]

    def __getattr__(self, name: str) -> Any:  # only called for names not found otherwise
        base = self.__dict__.get("base")
        if base is not None and name in _DELEGATED:
            return getattr(base, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def teacher_inputs(config: DistillConfig, root: Path, template: str) -> TeacherInputs:
    """The faces the teacher sees: the aligned images when its template is theirs
    (``arcface112``), else the original photos re-detected with the aligned folder's own
    settings (``align_report.json``) and warped to ``template``.

    Raises:
        ValueError: another template and no way to find the original photos.
    """
    if template == "arcface112":
        return AlignedFaces(root, template)
    report_file = root / ALIGN_REPORT
    report: dict[str, Any] = {}
    if report_file.is_file():
        report = json.loads(report_file.read_text(encoding="utf-8"))
    photos = config.photos_root or (Path(report["src"]) if "src" in report else None)
    if photos is None or not Path(photos).is_dir():
        raise ValueError(
            f"the teacher takes {template!r} faces, made from the original photos: set "
            f"[distill] photos_root to the tree {root} was aligned from (no usable "
            f"{ALIGN_REPORT} there names it)"
        )
    settings = report.get("settings", {})
    return RealignedFaces(
        Path(photos), root, template,
        detector=settings.get("detector", "hog"),
        landmarks=settings.get("landmarks", "dlib68"),
        upsample=int(settings.get("upsample", 1)),
        max_side=settings.get("max_side", 1024),
    )


def load_teacher(config: TrainConfig, dataset: Any, progress: bool = True) -> TeacherEmbeddings:
    """The teacher's embeddings of ``dataset``'s images (an ``IdentityFolder``: ``samples``
    under ``root``), from the cache (computed first if needed)."""
    from facemetric.inference import load_model

    if not hasattr(dataset, "samples") or not hasattr(dataset, "root"):
        raise ValueError(
            "[distill] needs an image-folder dataset (IdentityFolder: samples under root), "
            f"got {type(dataset).__name__}"
        )
    ds = config.distill
    assert ds.teacher is not None
    root = Path(dataset.root)
    rels = [Path(p).relative_to(root).as_posix() for p, _ in dataset.samples]
    template = load_model(ds.teacher).contract.template
    inputs = teacher_inputs(ds, root, template)
    return teacher_cache(ds.teacher, inputs, root, rels, chunk=ds.chunk, workers=ds.workers,
                         progress=progress)


def attach_teacher(config: TrainConfig, dataset: Any, progress: bool = True) -> TeacherTargets:
    """``dataset`` with each item's teacher embedding (see :class:`TeacherTargets`)."""
    cached = load_teacher(config, dataset, progress)
    rels = [Path(p).relative_to(Path(dataset.root)).as_posix() for p, _ in dataset.samples]
    return TeacherTargets(dataset, cached.rows_for(rels))


def build_objective(
    config: DistillConfig, label_loss: nn.Module | None, student_dim: int, teacher_dim: int
) -> DistillationObjective:
    """``label·[loss] + embedding·ℓ_emb + rkd_distance·ℓ_D + rkd_angle·ℓ_A +
    similarity·ℓ_S`` (terms with weight 0 left out); the embedding term gets a learned
    projection when the student's dimension is not the teacher's."""
    terms: dict[str, tuple[float, nn.Module]] = {}
    if config.embedding > 0:
        dims = (student_dim, teacher_dim) if student_dim != teacher_dim else (None, None)
        terms["embedding"] = (config.embedding, EmbeddingDistillationLoss(
            config.embedding_kind, student_dim=dims[0], teacher_dim=dims[1]))
    if config.rkd_distance > 0:
        terms["rkd_distance"] = (config.rkd_distance, RKDDistanceLoss())
    if config.rkd_angle > 0:
        terms["rkd_angle"] = (config.rkd_angle, RKDAngleLoss())
    if config.similarity > 0:
        terms["similarity"] = (config.similarity, SimilarityMatrixLoss())
    return DistillationObjective(label_loss if config.label > 0 else None, terms,
                                 label_weight=config.label)


__all__ = [
    "ALIGN_REPORT",
    "TeacherTargets",
    "attach_teacher",
    "build_objective",
    "load_teacher",
    "teacher_inputs",
]
