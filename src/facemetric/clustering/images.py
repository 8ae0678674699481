"""Images in, people out: :func:`cluster_images` detects every face of every image, embeds
them, and clusters them at the model's calibrated threshold, with faces of one image kept
apart (cannot-link). Stateless — the REST service's ``POST /v1/cluster`` and any script use
it; :class:`~facemetric.clustering.collection.PhotoCollection` is the stateful, incremental
version behind ``facemetric cluster``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from facemetric.clustering.methods import (
    ClusterOptions,
    cluster_embeddings,
    member_scores,
)
from facemetric.inference.calibration import Threshold
from facemetric.recognizer.faces import ImageInput


@dataclass(frozen=True, eq=False)
class ClusteredFace:
    """One face: ``image`` (index into the request), ``face`` (its index within the image),
    ``box (left, top, right, bottom)``, ``cluster`` (``-1``: fits no cluster) and ``score``
    (mean cosine to the other members of its cluster; ``None`` when alone). ``embedding``
    and the context ``crop`` are kept for the caller but not serialised."""

    image: int
    face: int
    box: tuple[int, int, int, int]
    cluster: int
    score: float | None
    embedding: np.ndarray
    crop: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        left, top, right, bottom = self.box
        return {"image": self.image, "face": self.face,
                "box": {"left": left, "top": top, "right": right, "bottom": bottom},
                "cluster": self.cluster, "score": self.score}


@dataclass(frozen=True)
class ImageProblem:
    """An image that gave no face: its index, the
    :class:`~facemetric.recognizer.Problem` value, and a sentence."""

    image: int
    problem: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "problem": self.problem, "detail": self.detail}


@dataclass(frozen=True, eq=False)
class ClusteringResult:
    """The answer of :func:`cluster_images`.

    ``clusters`` maps each cluster (``0..C−1``, biggest first) to the indices into
    ``faces`` of its members; ``refused`` counts merges the cannot-link constraint turned
    down (agglomerative), ``split`` HDBSCAN clusters split for holding two faces of one
    image.
    """

    faces: tuple[ClusteredFace, ...]
    problems: tuple[ImageProblem, ...]
    threshold: Threshold
    options: ClusterOptions
    refused: int = 0
    split: int = 0

    @property
    def clusters(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, f in enumerate(self.faces):
            if f.cluster >= 0:
                out.setdefault(f.cluster, []).append(i)
        return dict(sorted(out.items()))

    @property
    def unclustered(self) -> list[int]:
        return [i for i, f in enumerate(self.faces) if f.cluster < 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "faces": [f.to_dict() for f in self.faces],
            "clusters": [{"cluster": c, "faces": m} for c, m in self.clusters.items()],
            "unclustered": self.unclustered,
            "problems": [p.to_dict() for p in self.problems],
            "threshold": {"value": self.threshold.value, "far": self.threshold.far,
                          "impostors": self.threshold.impostors},
            "options": self.options.to_dict(),
            "refused_merges": self.refused,
            "split_clusters": self.split,
        }


def biggest_first(labels: np.ndarray) -> np.ndarray:
    """Renumber labels ``>= 0`` as ``0..C−1`` by decreasing size (ties: first appearance)."""
    out = np.full(labels.shape[0], -1, dtype=np.int64)
    keep = labels >= 0
    if not keep.any():
        return out
    ids, first, inverse, counts = np.unique(labels[keep], return_index=True,
                                            return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))
    rank = np.empty(ids.size, dtype=np.int64)
    rank[order] = np.arange(ids.size)
    out[keep] = rank[inverse.reshape(-1)]
    return out


def cluster_images(
    recognizer: Any, images: Sequence[ImageInput], options: ClusterOptions | None = None,
) -> ClusteringResult:
    """Detect, embed and cluster every face of ``images`` (paths, bytes, PIL images or
    uint8 arrays, as :meth:`~facemetric.recognizer.Recognizer.embed` takes).

    Args:
        recognizer: a :class:`~facemetric.recognizer.Recognizer` (its model must be
            calibrated: the threshold is ``recognizer.threshold(options.far)``).
        options: :class:`~facemetric.clustering.ClusterOptions`.

    An image that cannot be read or has no usable face is reported in ``problems``; the
    others are still clustered.
    """
    opts = options or ClusterOptions()
    threshold = recognizer.threshold(opts.far)
    found = recognizer.embed(list(images), policy="all")
    problems = tuple(ImageProblem(im.index, str(im.problem), im.detail)
                     for im in found if not im.ok)
    flat = [(im.index, j, f) for im in found if im.ok for j, f in enumerate(im.faces)]
    if not flat:
        return ClusteringResult((), problems, threshold, opts)
    emb = np.stack([f.embedding for _, _, f in flat])
    photos = np.array([i for i, _, _ in flat], dtype=np.int64)
    result = cluster_embeddings(emb, threshold.value, photos, opts)
    labels = biggest_first(result.labels)
    scores = member_scores(emb, labels)
    faces = tuple(
        ClusteredFace(i, j, f.box, int(labels[r]), None if np.isnan(scores[r])
                      else float(scores[r]), f.embedding, f.crop)
        for r, (i, j, f) in enumerate(flat))
    return ClusteringResult(faces, problems, threshold, opts, refused=result.refused,
                            split=result.split)


__all__ = ["ClusteredFace", "ClusteringResult", "ImageProblem", "biggest_first",
           "cluster_images"]
