"""Embedding maps: PCA against scikit-learn and numpy, deterministic subsampling, the
umap → t-SNE → PCA fallback, colouring of many identities, real PNGs."""

from __future__ import annotations

import sys
import types

import matplotlib.image
import numpy as np
import pytest
from PIL import Image
from sklearn.decomposition import PCA

from facemetric.evaluation import visualize
from facemetric.evaluation.visualize import (
    EmbeddingProjection,
    _subsample_indices,
    embedding_map,
    project_embeddings,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_title(path) -> str:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 200
    assert image[..., :3].std() > 0.01  # points and text, not a blank canvas
    with Image.open(path) as im:
        return im.text["Title"]


def clusters(num_ids: int, per_id: int, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    labels = np.repeat(np.arange(num_ids), per_id)
    return centres[labels] + 0.2 * rng.normal(size=(labels.shape[0], dim)), labels


def match_up_to_sign(a: np.ndarray, b: np.ndarray) -> None:
    for j in range(a.shape[1]):
        sign = np.sign(a[:, j] @ b[:, j])
        np.testing.assert_allclose(a[:, j], sign * b[:, j], atol=1e-9)


def block(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


@pytest.fixture
def capture_figure(keep_figures):
    """Keeps the figure each ``embedding_map`` call saves (and still saves it)."""
    return keep_figures(visualize)


# --------------------------------------------------------------------------- PCA


def test_pca_matches_sklearn_and_numpy_eigendecomposition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) @ np.diag([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 4.0
    proj = project_embeddings(x, method="pca")
    assert isinstance(proj, EmbeddingProjection) and proj.method == "pca"
    assert proj.coords.shape == (50, 2)
    match_up_to_sign(proj.coords, PCA(n_components=2).fit_transform(x))
    # Independent reference: eigenvectors of the covariance matrix.
    centred = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    top = vectors[:, np.argsort(values)[::-1][:2]]
    match_up_to_sign(proj.coords, centred @ top)
    # Sign convention: the loadings (recovered by least squares) have their largest-magnitude
    # entry positive, so the picture does not depend on the SVD routine's sign choice.
    loadings = np.linalg.lstsq(centred, proj.coords, rcond=None)[0]
    for j in range(2):
        assert loadings[np.argmax(np.abs(loadings[:, j])), j] > 0
    np.testing.assert_allclose(project_embeddings(-x, method="pca").coords, -proj.coords)


def test_pca_of_one_dimensional_data_pads_with_zeros():
    x = np.arange(10, dtype=np.float64)[:, None]
    coords = project_embeddings(x, method="pca").coords
    assert coords.shape == (10, 2)
    np.testing.assert_allclose(np.abs(coords[:, 0]), np.abs(x[:, 0] - 4.5))
    assert np.all(coords[:, 1] == 0)


# --------------------------------------------------------------------------- method choice


def test_auto_falls_back_to_tsne_then_pca(monkeypatch):
    x, _ = clusters(4, 10)
    block(monkeypatch, "umap")
    tsne = project_embeddings(x, method="auto", seed=1)
    assert tsne.method == "tsne"
    assert tsne.coords.shape == (40, 2) and np.isfinite(tsne.coords).all()
    block(monkeypatch, "sklearn.manifold")
    pca = project_embeddings(x, method="auto")
    assert pca.method == "pca"
    match_up_to_sign(pca.coords, PCA(n_components=2).fit_transform(x))
    with pytest.raises(ImportError, match="umap-learn"):
        project_embeddings(x, method="umap")
    with pytest.raises(ImportError, match="scikit-learn"):
        project_embeddings(x, method="tsne")


def test_auto_prefers_umap_when_importable(monkeypatch):
    calls = {}

    class FakeUMAP:
        def __init__(self, **kwargs):
            calls["kwargs"] = kwargs

        def fit_transform(self, x):
            calls["rows"] = x.shape[0]
            return x[:, :2] * 2.0

    fake = types.ModuleType("umap")
    fake.UMAP = FakeUMAP
    monkeypatch.setitem(sys.modules, "umap", fake)
    x, _ = clusters(3, 8, dim=5)
    proj = project_embeddings(x, seed=11)
    assert proj.method == "umap"
    assert calls["kwargs"]["random_state"] == 11 and calls["kwargs"]["n_components"] == 2
    np.testing.assert_allclose(proj.coords, x[:, :2] * 2.0)


def test_tiny_sets_use_pca_and_bad_methods_are_refused():
    x = np.random.default_rng(0).normal(size=(5, 4))
    assert project_embeddings(x).method == "pca"
    with pytest.raises(ValueError, match="at least"):
        project_embeddings(x, method="tsne")
    with pytest.raises(ValueError, match="method"):
        project_embeddings(x, method="isomap")
    with pytest.raises(ValueError, match="NaN"):
        project_embeddings(np.full((12, 3), np.nan))


# --------------------------------------------------------------------------- subsampling


def test_subsampling_is_deterministic():
    a = _subsample_indices(1000, 100, seed=3)
    b = _subsample_indices(1000, 100, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (100,) and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, _subsample_indices(1000, 100, seed=4))
    np.testing.assert_array_equal(_subsample_indices(50, 100, seed=3), np.arange(50))
    with pytest.raises(ValueError, match="max_points"):
        _subsample_indices(10, 0, seed=0)


def test_embedding_map_subsamples_the_same_points(tmp_path, monkeypatch):
    x, labels = clusters(30, 20)  # 600 points
    seen = []
    original = visualize.project_embeddings

    def spy(emb, method="auto", seed=0):
        seen.append(np.array(emb))
        return original(emb, method, seed)

    monkeypatch.setattr(visualize, "project_embeddings", spy)
    one = embedding_map(x, labels, tmp_path / "a.png", method="pca", max_points=150, seed=5)
    two = embedding_map(x, labels, tmp_path / "b.png", method="pca", max_points=150, seed=5)
    embedding_map(x, labels, tmp_path / "c.png", method="pca", max_points=150, seed=6)
    assert one.read_bytes() == two.read_bytes()
    np.testing.assert_array_equal(seen[0], seen[1])
    assert not np.array_equal(seen[0], seen[2])
    # The rows projected are the chosen rows, L2-normalised.
    keep = _subsample_indices(600, 150, seed=5)
    expected = x[keep] / np.linalg.norm(x[keep], axis=1, keepdims=True)
    np.testing.assert_allclose(seen[0], expected, rtol=1e-6)
    assert png_title(one) == "Embeddings — PCA (150 of 600 points, 30 identities)"


# --------------------------------------------------------------------------- the picture


def test_embedding_map_pca_fallback_few_identities_with_legend(
    tmp_path, monkeypatch, capture_figure
):
    block(monkeypatch, "umap", "sklearn.manifold")
    x, labels = clusters(5, 12)
    names = np.array(["ann", "bob", "cy", "dee", "eve"])[labels]
    out = embedding_map(x, names, tmp_path / "map.png", title="ORL")
    assert out == tmp_path / "map.png"
    assert png_title(out) == "ORL — PCA (60 points, 5 identities)"
    ax = capture_figure[0].axes[0]
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["ann", "bob", "cy", "dee", "eve"]
    colours = {tuple(np.round(c.get_facecolor()[0], 4)) for c in ax.collections}
    assert len(colours) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]  # no temporary file left


def test_embedding_map_many_identities_cycles_colours_without_legend(tmp_path, capture_figure):
    x, labels = clusters(60, 3)
    out = embedding_map(x, labels, tmp_path / "many.png", method="pca")
    assert png_title(out) == "Embeddings — PCA (180 points, 60 identities)"
    ax = capture_figure[0].axes[0]
    assert ax.get_legend() is None
    # 20 colours × 3 marker shapes: every identity gets its own (shape, colour).
    assert len(ax.collections) == 3
    styles = set()
    for k, coll in enumerate(ax.collections):
        colours = np.round(coll.get_facecolor(), 4)
        assert len({tuple(c) for c in colours}) == 20
        styles |= {(k, tuple(c)) for c in colours}
    assert len(styles) == 60
    assert sum(c.get_offsets().shape[0] for c in ax.collections) == 180


def test_embedding_map_tsne_title(tmp_path, monkeypatch):
    block(monkeypatch, "umap")
    x, labels = clusters(3, 10)
    out = embedding_map(x, labels, tmp_path / "tsne.png")
    assert png_title(out) == "Embeddings — t-SNE (30 points, 3 identities)"


def test_embedding_map_checks_inputs_and_writes_nothing(tmp_path):
    x, labels = clusters(3, 5)
    with pytest.raises(ValueError, match="labels"):
        embedding_map(x, labels[:-1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="max_points"):
        embedding_map(x, labels, tmp_path / "x.png", max_points=0)
    with pytest.raises(ValueError, match="method"):
        embedding_map(x, labels, tmp_path / "x.png", method="lda")
    assert list(tmp_path.iterdir()) == []


def test_embedding_map_without_matplotlib(tmp_path, monkeypatch):
    block(monkeypatch, "matplotlib")
    x, labels = clusters(3, 5)
    with pytest.raises(ImportError, match=r"facemetric\[plot\]"):
        embedding_map(x, labels, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
