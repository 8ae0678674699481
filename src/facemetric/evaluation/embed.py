"""Embeddings of image files from a trained model: the bridge from checkpoints to arrays.

The rest of ``facemetric.evaluation`` works on arrays; this module produces them.
``load_embedder(checkpoint)`` rebuilds the backbone a training checkpoint names (its stored
configuration) with the stored weights, in eval mode. ``Embedder.embed_paths(paths)``:

1. loads each file with ``facemetric.data.images.load_image`` (robust decoding to RGB);
2. preprocesses it as training's ``eval_transform(image_size)`` does: resize to the
   training ``[data] image_size``, then ``(x/255 − 0.5)/0.5``, ``(3, H, W)`` float32;
3. runs the model in eval mode under ``torch.inference_mode`` in batches;
4. flip test (on by default): ``e = f(x) + f(flip(x))`` with ``flip`` the left–right mirror
   — the sum of the two embeddings — then every row is L2-normalised: ``e / ‖e‖``.

An image that cannot be loaded never becomes a zero (or any other made-up) vector: its row
is ``NaN``, it is logged (path and reason) and listed in ``Embedder.failures`` after the
call, so downstream code must decide what to do with it (``evaluate`` drops the pairs that
use it and says so in the report).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from facemetric.data.folders import LoadFailure
from facemetric.data.images import ImageLoadError, load_image
from facemetric.data.transforms import eval_transform
from facemetric.evaluation.protocols import PairList

logger = logging.getLogger(__name__)

_MIN_NORM = 1e-12


def _device(requested: str | torch.device) -> torch.device:
    if isinstance(requested, torch.device):
        return requested
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


@dataclass(frozen=True, eq=False)  # holds arrays
class PairEmbeddings:
    """Embeddings of a pair list's distinct images, and where each pair's images sit.

    ``embeddings[i]`` belongs to ``images[i]`` (``NaN`` row if it failed to load; see
    ``failures``); pair ``j`` compares rows ``index_a[j]`` and ``index_b[j]``.
    """

    images: tuple[Path, ...]
    embeddings: np.ndarray
    index_a: np.ndarray
    index_b: np.ndarray
    failures: tuple[LoadFailure, ...]

    @property
    def valid(self) -> np.ndarray:
        """``(num_pairs,)`` bool: both images of the pair were embedded."""
        ok = np.isfinite(self.embeddings).all(axis=1)
        return ok[self.index_a] & ok[self.index_b]

    def scores(self) -> np.ndarray:
        """Cosine similarity of each pair, ``(num_pairs,)`` float64: the dot product of the
        two L2-normalised rows; ``NaN`` where an image failed."""
        e = self.embeddings.astype(np.float64)
        return np.einsum("ij,ij->i", e[self.index_a], e[self.index_b])


class Embedder:
    """A backbone plus the preprocessing it was trained with; see the module docstring.

    Args:
        model: maps ``(B, 3, image_size, image_size)`` float images to ``(B, D)``.
        image_size: side the images are resized to (training's ``[data] image_size``).
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``; the model is moved.
        workers: threads decoding image files (PIL releases the GIL while decoding).
        channels_last: run the model in NHWC layout (the model's weights are converted in
            place; the numbers are the same, a CPU training step 1.47× faster, see
            ``docs/benchmarks.md``).

    ``failures`` lists the images the most recent ``embed_*`` call could not load.
    The model's training mode is restored after every call, so an ``Embedder`` can wrap a
    model that is being trained (``facemetric.evaluation.compare`` does).
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        *,
        device: str | torch.device = "cpu",
        workers: int = 1,
        metadata: dict[str, Any] | None = None,
        channels_last: bool = True,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.device = _device(device)
        self.model = model.to(self.device)
        self._layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self._layout)
        self.image_size = int(image_size)
        self.workers = int(workers)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.failures: list[LoadFailure] = []
        self._transform = eval_transform(self.image_size)

    # ------------------------------------------------------------------ preprocessing

    def preprocess(self, image: np.ndarray) -> Tensor:
        """``(H, W, 3)`` uint8 RGB → ``(3, S, S)`` float32, as training's eval transform."""
        return self._transform(image, np.random.default_rng(0))  # draws nothing

    def load_tensors(
        self, paths: Sequence[str | os.PathLike[str]]
    ) -> tuple[Tensor, np.ndarray, list[LoadFailure]]:
        """Decode and preprocess ``paths``: ``(images (n_ok, 3, S, S), ok (n,) bool,
        failures)``; ``images`` holds the loadable ones in order."""
        paths = [Path(p) for p in paths]

        def one(path: Path) -> Tensor | LoadFailure:
            try:
                return self.preprocess(load_image(path))
            except ImageLoadError as err:
                return LoadFailure(err.path, err.reason)

        if self.workers > 1 and len(paths) > 1:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                results = list(pool.map(one, paths))
        else:
            results = [one(p) for p in paths]
        ok = np.array([isinstance(r, Tensor) for r in results], dtype=bool)
        tensors = [r for r in results if isinstance(r, Tensor)]
        failures = [r for r in results if isinstance(r, LoadFailure)]
        size = (0, 3, self.image_size, self.image_size)
        images = torch.stack(tensors) if tensors else torch.empty(size)
        return images, ok, failures

    # ------------------------------------------------------------------ embedding

    def _forward(self, x: Tensor, flip: bool) -> Tensor:
        x = x.to(self.device, dtype=torch.float32).contiguous(memory_format=self._layout)
        out = self.model(x).float()
        if flip:
            out = out + self.model(x.flip(-1)).float()
        return out / out.norm(dim=1, keepdim=True).clamp_min(_MIN_NORM)

    def embed_tensor(self, images: Tensor, batch_size: int = 64, flip: bool = True) -> np.ndarray:
        """Embed preprocessed ``(n, 3, S, S)`` images: ``(n, D)`` float32, rows of norm 1."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.failures = []
        batches = ((images[a:b], None) for a, b in _chunks(len(images), batch_size))
        return self._embed_batches(batches, len(images), batch_size, flip, None)

    def _embed_batches(
        self,
        batches: Iterable[tuple[Tensor, np.ndarray | None]],
        total: int,
        batch_size: int,
        flip: bool,
        bar: tqdm | None,
    ) -> np.ndarray:
        """Run ``(images, ok-mask or None)`` batches through the model; rows whose mask is
        False stay NaN."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out: np.ndarray | None = None
        row = 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for images, ok in batches:
                    n = len(images) if ok is None else int(ok.shape[0])
                    emb = self._forward(images, flip).cpu().numpy() if len(images) else None
                    if emb is not None and out is None:
                        out = np.full((total, emb.shape[1]), np.nan, dtype=np.float32)
                    if emb is not None and out is not None:
                        target = np.arange(row, row + n)
                        out[target if ok is None else target[ok]] = emb
                    row += n
                    if bar is not None:
                        bar.update(n)
        finally:
            self.model.train(was_training)
        if out is None:  # nothing loadable: the width comes from one dummy forward pass
            out = np.full((total, self._width()), np.nan, dtype=np.float32)
        return out

    def _width(self) -> int:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
                return int(self.model(x).shape[1])
        finally:
            self.model.train(was_training)

    def embed_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        batch_size: int = 64,
        flip: bool = True,
        progress: bool = True,
    ) -> np.ndarray:
        """Embed image files: ``(len(paths), D)`` float32, L2-normalised rows.

        Rows of files that cannot be loaded are ``NaN``; those files are logged and listed
        in ``self.failures`` (path and reason). Decoding is done ``batch_size`` files at a
        time, so memory stays bounded.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        paths = [Path(p) for p in paths]
        failures: list[LoadFailure] = []

        def batches() -> Iterator[tuple[Tensor, np.ndarray]]:
            for a, b in _chunks(len(paths), batch_size):
                images, ok, failed = self.load_tensors(paths[a:b])
                failures.extend(failed)
                yield images, ok

        bar = tqdm(total=len(paths), unit="img", desc="embed", disable=not progress,
                   dynamic_ncols=True)
        try:
            out = self._embed_batches(batches(), len(paths), batch_size, flip, bar)
        finally:
            bar.close()
        self._report(failures)
        return out

    def embed_arrays(
        self, images: Sequence[np.ndarray], batch_size: int = 64, flip: bool = True
    ) -> np.ndarray:
        """Embed decoded ``(H, W, 3)`` uint8 RGB arrays: ``(n, D)`` float32, unit rows."""

        def batches() -> Iterator[tuple[Tensor, None]]:
            for a, b in _chunks(len(images), batch_size):
                yield torch.stack([self.preprocess(im) for im in images[a:b]]), None

        self.failures = []
        return self._embed_batches(batches(), len(images), batch_size, flip, None)

    def embed_pairs(
        self, pairs: PairList, batch_size: int = 64, flip: bool = True, progress: bool = True
    ) -> PairEmbeddings:
        """Embed every distinct image of ``pairs`` once (``PairList.unique_images``)."""
        images, index_a, index_b = pairs.unique_images()
        emb = self.embed_paths(images, batch_size=batch_size, flip=flip, progress=progress)
        return PairEmbeddings(images, emb, index_a, index_b, tuple(self.failures))

    def _report(self, failures: list[LoadFailure]) -> None:
        self.failures = list(failures)
        if failures:
            listing = "\n".join(f"  {f.path}: {f.reason}" for f in failures)
            logger.warning("%d image(s) could not be loaded; their embeddings are NaN:\n%s",
                           len(failures), listing)


def model_from_checkpoint(
    state: dict[str, Any], source: str = "checkpoint"
) -> tuple[nn.Module, Any]:
    """``(backbone with the stored weights, TrainConfig)`` from a loaded checkpoint dict."""
    from facemetric.training.builders import build_model
    from facemetric.training.config import config_from_dict

    if "model" not in state or "config" not in state:
        raise ValueError(f"{source} holds no model weights and configuration")
    config = config_from_dict(state["config"], source=source)
    model = build_model(config.model)
    model.load_state_dict(state["model"])
    return model.eval(), config


def load_embedder(
    checkpoint: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    workers: int = 1,
) -> Embedder:
    """An :class:`Embedder` for a training checkpoint (``checkpoint_<step>.pt``) or a run's
    folder (its newest checkpoint): the backbone its ``[model]`` section names, with its
    weights, in eval mode, fed images resized to its ``[data] image_size``.

    Raises:
        FileNotFoundError: no such file, or a folder without checkpoints.
        ValueError: not a facemetric checkpoint.
    """
    from facemetric.training.checkpoint import latest_checkpoint, load_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds no checkpoint_*.pt file")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    state = load_checkpoint(path, map_location="cpu")
    model, config = model_from_checkpoint(state, str(path))
    metadata = {
        "checkpoint": str(path),
        "step": int(state.get("step", 0)),
        "model": config.model.name,
        "embedding_size": config.model.embedding_size,
        "image_size": config.data.image_size,
        "loss": config.loss.name,
    }
    return Embedder(model, config.data.image_size, device=device, workers=workers,
                    metadata=metadata)


__all__ = ["Embedder", "PairEmbeddings", "load_embedder", "model_from_checkpoint"]
