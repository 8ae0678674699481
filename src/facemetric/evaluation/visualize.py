"""2-D maps of embeddings coloured by identity.

Projection methods, tried in this order by ``method="auto"``:

- ``"umap"``: ``umap.UMAP`` (McInnes et al. 2018) when the ``umap-learn`` package imports;
- ``"tsne"``: scikit-learn's Barnes–Hut t-SNE (van der Maaten & Hinton 2008) when
  scikit-learn imports; perplexity ``min(30, (n − 1) / 3)``, PCA initialisation;
- ``"pca"``: the first two principal components, ``X_c V₂`` with ``X_c = X − mean`` and
  ``V₂`` the two leading right singular vectors of ``X_c`` (numpy SVD; no extra package).
  Each component's sign is fixed so that its largest-magnitude loading is positive.

``auto`` uses PCA for fewer than ``_MIN_POINTS_NONLINEAR`` points, where neighbour-based
maps are meaningless. Both optional packages are imported lazily, only when used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.evaluation._arrays import check_embeddings, to_numpy
from facemetric.evaluation.plots import _new_figure, _save_figure

METHODS: tuple[str, ...] = ("umap", "tsne", "pca")
_MIN_POINTS_NONLINEAR = 10
_LEGEND_MAX_IDENTITIES = 20
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_METHOD_NAMES = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}


@dataclass(frozen=True, eq=False)  # holds an array
class EmbeddingProjection:
    """``coords`` ``(n, 2)`` float64 and the ``method`` that produced them."""

    coords: np.ndarray
    method: str


def _pca(x: np.ndarray, n_components: int = 2) -> np.ndarray:
    """``(n, d) -> (n, n_components)`` principal-component scores (zero-padded if the data
    has fewer dimensions or points than components)."""
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:n_components]
    signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
    vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
    scores = centred @ vt.T
    if scores.shape[1] < n_components:
        scores = np.pad(scores, ((0, 0), (0, n_components - scores.shape[1])))
    return scores


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (x.shape[0] - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64)


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import umap

    n_neighbors = int(min(15, x.shape[0] - 1))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed)
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def _importable(method: str) -> bool:
    try:
        if method == "umap":
            import umap  # noqa: F401
        elif method == "tsne":
            from sklearn.manifold import TSNE  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_method(method: str, num_points: int) -> str:
    if method not in ("auto", *METHODS):
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    if method != "auto":
        if method != "pca" and num_points < _MIN_POINTS_NONLINEAR:
            raise ValueError(f"{method} needs at least {_MIN_POINTS_NONLINEAR} points")
        if not _importable(method):
            package = "umap-learn" if method == "umap" else "scikit-learn"
            raise ImportError(f"method {method!r} needs {package}: pip install {package}")
        return method
    if num_points < _MIN_POINTS_NONLINEAR:
        return "pca"
    return next(m for m in METHODS if m == "pca" or _importable(m))


def project_embeddings(embeddings: Any, method: str = "auto", seed: int = 0) -> EmbeddingProjection:
    """Project ``(n, d)`` embeddings to 2-D with ``method`` (module docstring).

    ``seed`` fixes t-SNE/UMAP's randomness. Raises ``ImportError`` when an explicitly asked
    method's package is missing, ``ValueError`` for an unknown method or too few points.
    """
    x = check_embeddings(embeddings).double().numpy()
    chosen = _resolve_method(method, x.shape[0])
    if chosen == "umap":
        coords = _umap(x, seed)
    elif chosen == "tsne":
        coords = _tsne(x, seed)
    else:
        coords = _pca(x)
    return EmbeddingProjection(coords=coords, method=chosen)


def _subsample_indices(num: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(num, max_points)`` rows drawn without replacement from
    ``seed`` (all rows, in order, when ``num ≤ max_points``)."""
    if max_points < 1:
        raise ValueError(f"max_points must be ≥ 1, got {max_points}")
    if num <= max_points:
        return np.arange(num)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num, size=max_points, replace=False))


def embedding_map(
    embeddings: Any,
    labels: Any,
    path: str | os.PathLike[str],
    method: str = "auto",
    max_points: int = 5000,
    seed: int = 0,
    *,
    normalize: bool = True,
    title: str = "Embeddings",
) -> Path:
    """Scatter plot of a 2-D projection of ``(n, d)`` embeddings, coloured by label; PNG.

    Above ``max_points`` rows a subset of ``max_points`` is drawn without replacement from
    ``seed`` (the same subset every time). Rows are L2-normalised first when ``normalize``
    (the map then reflects cosine similarity). Identities get the 20 ``tab20`` colours in
    turn (strong shades first); beyond 20 the marker shape changes too (8 shapes), and the
    legend is shown only for at most 20 identities. The title, also stored as the PNG's
    ``Title``, names the method used and the counts. Written atomically; returns ``Path(path)``.
    """
    x = check_embeddings(embeddings).double().numpy()
    lab = to_numpy(labels)
    if lab.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {lab.shape}")
    total = x.shape[0]
    keep = _subsample_indices(total, max_points, seed)
    x, lab = x[keep], lab[keep]
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    fig = _new_figure(7.0, 6.0)  # fails fast, before a slow projection, without matplotlib
    projection = project_embeddings(x, method, seed)
    identities, ident = np.unique(lab, return_inverse=True)
    ident = ident.reshape(-1)
    num_ids = identities.shape[0]

    ax = fig.add_subplot()
    colors = np.asarray(_tab20())
    size = float(np.clip(3000.0 / x.shape[0], 4.0, 36.0))
    xy = projection.coords
    if num_ids <= _LEGEND_MAX_IDENTITIES:
        for i, name in enumerate(identities):
            mask = ident == i
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=colors[i], label=str(name))
        ax.legend(fontsize="small", markerscale=max(1.0, 20.0 / size) ** 0.5, loc="best")
    else:
        marker_of = (ident // len(colors)) % len(_MARKERS)
        for m, marker in enumerate(_MARKERS):
            mask = marker_of == m
            if mask.any():
                c = colors[ident[mask] % len(colors)]
                ax.scatter(xy[mask, 0], xy[mask, 1], s=size, c=c, marker=marker, linewidths=0)
    heading = (
        f"{title} — {_METHOD_NAMES[projection.method]} "
        f"({_count_text(keep.shape[0], total)}, {num_ids} identities)"
    )
    ax.set_title(heading, fontsize="medium")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return _save_figure(fig, path, heading)


def _count_text(shown: int, total: int) -> str:
    return f"{shown} points" if shown == total else f"{shown} of {total} points"


def _tab20() -> list[tuple[float, float, float]]:
    """The 20 ``tab20`` colours, the 10 strong ones first (so up to 10 identities never get
    a light and a dark shade of one hue)."""
    from matplotlib import colormaps

    colors = [tuple(c) for c in colormaps["tab20"].colors]
    return colors[0::2] + colors[1::2]


__all__ = ["EmbeddingProjection", "embedding_map", "project_embeddings"]
