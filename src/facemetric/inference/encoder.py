"""Encoders: aligned faces in, unit embeddings out, under a stated :class:`ModelContract`.

:class:`Encoder` is the one interface everything that *uses* a model takes (evaluation, the
recognizer, the gallery, the service). It owns the steps every backend shares:

1. check the batch: ``(n, T, T, 3)`` uint8 RGB (a list of such arrays is stacked);
2. run the backend on ``batch_size`` faces at a time (``_forward``: uint8 faces → raw
   ``(b, D)`` float32 embeddings; the torch and ONNX backends resize and normalise with
   :func:`input_tensor`);
3. flip test when the contract says so: ``e = f(x) + f(mirror(x))``;
4. L2-normalise every row: ``e / max(‖e‖, 1e-12)``.

Backends: :class:`TorchEncoder` (a backbone in memory; ``load_model`` builds it from a
training run), ``OnnxEncoder`` (onnxruntime) and ``DlibEncoder`` (dlib's ResNet descriptor).

:func:`embed_files` embeds aligned image files with per-file failures (a file that cannot
be read is a ``NaN`` row and a :class:`~facemetric.data.folders.LoadFailure`, never a made-up
vector); :func:`embed_pairs` embeds each distinct image of a pair list once.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from facemetric.data.folders import LoadFailure
from facemetric.data.images import ImageLoadError, load_image
from facemetric.data.transforms import Resize
from facemetric.inference.calibration import ThresholdTable
from facemetric.inference.contract import ModelContract

logger = logging.getLogger(__name__)

_MIN_NORM = 1e-12


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def as_face_batch(faces: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Stack ``faces`` into ``(n, H, W, 3)`` uint8, checking dtype and shape.

    Raises:
        ValueError: not uint8 RGB, or faces of different sizes in one list.
    """
    if isinstance(faces, np.ndarray):
        batch = faces[None] if faces.ndim == 3 else faces
    else:
        faces = list(faces)
        if not faces:
            return np.zeros((0, 1, 1, 3), dtype=np.uint8)
        shapes = {np.asarray(f).shape for f in faces}
        if len(shapes) != 1:
            raise ValueError(
                f"faces in one batch must share one size, got {sorted(shapes)}: align them to "
                "the encoder's template first"
            )
        batch = np.stack([np.asarray(f) for f in faces])
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(
            f"faces must be uint8 RGB arrays (n, H, W, 3), got dtype {batch.dtype} and shape "
            f"{batch.shape}"
        )
    return batch


def input_tensor(faces: np.ndarray, contract: ModelContract) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 → ``(n, 3, S, S)`` float32 network input, ``S = input_size``:
    resized as training's eval transform does (area when shrinking, linear when growing),
    then ``(x / 255 − mean) / std`` per channel."""
    size = contract.input_size
    resize = Resize(size)
    if faces.shape[1:3] != (size, size):
        faces = np.stack([resize(f, np.random.default_rng(0)) for f in faces])
    x = torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.div_(255.0).sub_(mean).div_(std).contiguous().numpy()


class Encoder(abc.ABC):
    """Aligned faces → unit embeddings, under ``self.contract`` (module docstring)."""

    contract: ModelContract
    #: the model's calibrated FAR → threshold table, when it has one
    thresholds: ThresholdTable | None = None

    @abc.abstractmethod
    def _forward(self, faces: np.ndarray) -> np.ndarray:
        """``(b, T, T, 3)`` uint8 aligned faces → raw ``(b, D)`` float32 embeddings."""

    def embed_faces(
        self, faces: np.ndarray | Sequence[np.ndarray], batch_size: int = 64
    ) -> np.ndarray:
        """Embed aligned faces: ``(n, D)`` float32 rows of unit norm (module docstring)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        batch = as_face_batch(faces)
        dim = self.contract.embedding_size
        out = np.empty((len(batch), dim), dtype=np.float32)
        for a, b in _chunks(len(batch), batch_size):
            emb = self._forward(batch[a:b]).astype(np.float32, copy=False)
            if self.contract.flip_test:
                emb = emb + self._forward(np.ascontiguousarray(batch[a:b, :, ::-1]))
            norms = np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), _MIN_NORM)
            out[a:b] = emb / norms
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.contract.describe()})"


class TorchEncoder(Encoder):
    """A backbone in memory: ``(B, 3, S, S) → (B, D)``, run in eval mode without gradients.

    Args:
        model: the backbone (its training mode is restored after every call, so an encoder
            can wrap a model that is being trained).
        contract: what it takes and returns.
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``; the model is moved.
        channels_last: run in NHWC layout (same numbers; faster on CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        contract: ModelContract,
        *,
        device: str | torch.device = "cpu",
        channels_last: bool = True,
    ) -> None:
        self.contract = contract
        self.device = _device(device)
        self._layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device).to(memory_format=self._layout)

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(input_tensor(faces, self.contract))
        return self.forward_tensor(x)

    def forward_tensor(self, x: torch.Tensor) -> np.ndarray:
        """Raw embeddings of a preprocessed ``(b, 3, S, S)`` float batch."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                x = x.to(self.device, dtype=torch.float32).contiguous(memory_format=self._layout)
                return self.model(x).float().cpu().numpy()
        finally:
            self.model.train(was_training)


def _device(requested: str | torch.device) -> torch.device:
    if isinstance(requested, torch.device):
        return requested
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class _PairList(Protocol):
    def unique_images(self) -> tuple[tuple[Path, ...], np.ndarray, np.ndarray]: ...


@dataclass(frozen=True, eq=False)  # holds arrays
class EmbeddedFiles:
    """``embeddings[i]`` of ``paths[i]``; ``NaN`` rows for the files listed in ``failures``."""

    paths: tuple[Path, ...]
    embeddings: np.ndarray
    failures: tuple[LoadFailure, ...]

    @property
    def ok(self) -> np.ndarray:
        """``(n,)`` bool: the file was embedded."""
        return np.isfinite(self.embeddings).all(axis=1)


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
        two unit rows; ``NaN`` where an image failed."""
        e = self.embeddings.astype(np.float64)
        return np.einsum("ij,ij->i", e[self.index_a], e[self.index_b])


def embed_files(
    encoder: Encoder,
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 64,
    workers: int = 1,
    progress: bool = True,
) -> EmbeddedFiles:
    """Embed aligned face image files (already in the encoder's template).

    Files are decoded ``batch_size`` at a time (``workers`` threads), so memory stays
    bounded. A file that cannot be decoded gets a ``NaN`` row, is logged and is listed in
    ``failures`` with its reason.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be positive, got {batch_size}, {workers}")
    paths = tuple(Path(p) for p in paths)
    out = np.full((len(paths), encoder.contract.embedding_size), np.nan, dtype=np.float32)
    failures: list[LoadFailure] = []

    def load(path: Path) -> np.ndarray | LoadFailure:
        try:
            return load_image(path)
        except ImageLoadError as err:
            return LoadFailure(err.path, err.reason)

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    bar = tqdm(total=len(paths), unit="img", desc="embed", disable=not progress,
               dynamic_ncols=True)
    try:
        for a, b in _chunks(len(paths), batch_size):
            loaded = list(pool.map(load, paths[a:b]) if pool else map(load, paths[a:b]))
            good = [i for i, r in enumerate(loaded) if isinstance(r, np.ndarray)]
            failures.extend(r for r in loaded if isinstance(r, LoadFailure))
            if good:
                faces = stack_faces([loaded[i] for i in good], encoder.contract)  # type: ignore[misc]
                out[a + np.asarray(good)] = encoder.embed_faces(faces, batch_size=batch_size)
            bar.update(b - a)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    if failures:
        listing = "\n".join(f"  {f.path}: {f.reason}" for f in failures)
        logger.warning("%d image(s) could not be loaded; their embeddings are NaN:\n%s",
                       len(failures), listing)
    return EmbeddedFiles(paths, out, tuple(failures))


def stack_faces(images: Sequence[np.ndarray], contract: ModelContract) -> np.ndarray:
    """Stack decoded files. Files of one size go to the encoder as they are (it resizes to
    its input size, as training's eval transform did); a batch of mixed sizes is resized
    to the network's input size first."""
    if len({im.shape for im in images}) == 1:
        return np.stack(images)
    resize = Resize(contract.input_size)
    rng = np.random.default_rng(0)
    return np.stack([resize(im, rng) for im in images])


def embed_pairs(
    encoder: Encoder,
    pairs: _PairList,
    *,
    batch_size: int = 64,
    workers: int = 1,
    progress: bool = True,
) -> PairEmbeddings:
    """Embed every distinct image of ``pairs`` once (``PairList.unique_images``)."""
    images, index_a, index_b = pairs.unique_images()
    res = embed_files(encoder, images, batch_size=batch_size, workers=workers, progress=progress)
    return PairEmbeddings(tuple(images), res.embeddings, index_a, index_b, res.failures)


__all__ = [
    "EmbeddedFiles",
    "Encoder",
    "PairEmbeddings",
    "TorchEncoder",
    "as_face_batch",
    "embed_files",
    "embed_pairs",
    "input_tensor",
    "stack_faces",
]
