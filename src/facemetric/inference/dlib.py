"""dlib's ResNet face descriptor as an :class:`~facemetric.inference.encoder.Encoder`.

``dlib_face_recognition_resnet_model_v1.dat`` (from the ``face_recognition_models``
package; 99.38% published on LFW View 2) maps a 150×150 chip aligned the way
``dlib.get_face_chip`` aligns it (template ``"dlib150"``: make chips with
:func:`facemetric.align.warp_to_template`) to a 128-d descriptor. dlib compares descriptors
by Euclidean distance of the raw descriptors (same person below 0.6). The raw descriptors
are *not* unit vectors: their norms range from 1.27 to 1.59 (median 1.44) on 198 LFW
deep-funneled faces (pairsDevTest, 5-point chips). Like every encoder, this one returns
L2-normalised rows, compared by cosine; for unit vectors ``‖a − b‖² = 2 − 2·cos(a, b)``,
so cosine ranks pairs as the Euclidean distance *of the normalised descriptors* does —
close to, not exactly, dlib's raw distance (Spearman correlation 0.988 on 120 of those
pairs, both with AUC 1.0). dlib's 0.6 is therefore no cosine threshold: calibrate one
(``facemetric.inference.calibration``).

Two engines give the same descriptors: ``"torch"`` (the default) runs the network ported
to torch (:mod:`facemetric.models.dlib_resnet`, weights read from the same file; max
|Δ| < 5e-6 against dlib's on real faces, ``tests/models/test_dlib_resnet.py``), 12× faster
per core than ``"dlib"`` on this project's 2-core machine (``benchmarks/distill.py port``:
86.6 vs 7.2 img/s), which calls dlib's own ``face_recognition_model_v1``. The engine
is recorded in ``contract.extra`` and does not change the fingerprint: a gallery enrolled
with one engine is searched with the other.

Contract: backbone ``"dlib_resnet_v1"``, template ``"dlib150"``, input 150 px, ``D = 128``,
no flip test by default (dlib's descriptor is used without one), ``weights_sha256`` the
SHA-256 of the ``.dat`` file's bytes, source ``"dlib"``. ``mean``/``std`` are recorded as
``(0, 0, 0)``/``(1, 1, 1)``: dlib takes raw 0–255 pixels and normalises inside its network.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemetric.data.transforms import Resize
from facemetric.inference.contract import ModelContract
from facemetric.inference.encoder import Encoder
from facemetric.models.dlib_resnet import (
    DLIB_EMBEDDING_SIZE,
    DLIB_INPUT_SIZE,
    MODEL_FILE,
    dlib_model_path,
)

BACKBONE = "dlib_resnet_v1"
CHIP_SIZE = DLIB_INPUT_SIZE
EMBEDDING_SIZE = DLIB_EMBEDDING_SIZE
ENGINES = ("torch", "dlib")


@functools.cache
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def _load(path: str, engine: str) -> Any:
    """The network behind ``engine`` (dlib's object, or the torch port in eval mode), once
    per process and file."""
    if engine == "dlib":
        from facemetric.align.detect import _dlib

        return _dlib().face_recognition_model_v1(path)
    from facemetric.models.dlib_resnet import dlib_resnet

    return dlib_resnet(weights=path).eval().to(memory_format=torch.channels_last)


class DlibEncoder(Encoder):
    """dlib's 128-d ResNet face descriptor on ``dlib150`` chips (module docstring).

    Args:
        flip_test: add the mirror image's descriptor before normalising (off by default).
        model_path: another copy of ``dlib_face_recognition_resnet_model_v1.dat``; by default
            the one in ``face_recognition_models``.
        engine: ``"torch"`` (the port, default) or ``"dlib"`` (dlib's own network).

    Raises:
        ImportError: dlib or ``face_recognition_models`` is missing (with the install hint).
        ValueError: an unknown engine.

    Neither engine promises safe concurrent calls on one network: use one encoder per
    thread or processes.
    """

    def __init__(
        self,
        flip_test: bool = False,
        model_path: str | os.PathLike[str] | None = None,
        engine: str = "torch",
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if model_path is None:
            path = dlib_model_path()
        else:
            path = Path(model_path)
            if not path.is_file():
                raise FileNotFoundError(f"no dlib descriptor model file {path}")
        self.model_path = path.resolve()
        self.engine = engine
        self._net = _load(str(self.model_path), engine)
        sha = _sha256(str(self.model_path))
        self.contract = ModelContract(
            backbone=BACKBONE,
            input_size=CHIP_SIZE,
            template="dlib150",
            embedding_size=EMBEDDING_SIZE,
            weights_sha256=sha,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            flip_test=flip_test,
            source="dlib",
            extra={"model_file": str(self.model_path), "engine": engine},
        )

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        """``(b, T, T, 3)`` uint8 chips → ``(b, 128)`` raw descriptors (one batch call);
        chips of another size are resized to 150×150 first (area when shrinking). Resizing
        does not re-align: an ``arcface112`` crop is framed differently from dlib's chip
        and gives worse descriptors; make ``dlib150`` chips with ``warp_to_template``."""
        if faces.shape[1:3] != (CHIP_SIZE, CHIP_SIZE):
            resize = Resize(CHIP_SIZE)
            rng = np.random.default_rng(0)
            faces = np.stack([resize(f, rng) for f in faces])
        if len(faces) == 0:
            return np.zeros((0, EMBEDDING_SIZE), dtype=np.float32)
        if self.engine == "torch":
            x = torch.from_numpy(np.ascontiguousarray(faces.transpose(0, 3, 1, 2)))
            x = (x.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                return self._net(x).numpy().astype(np.float32)
        chips = [np.ascontiguousarray(f, dtype=np.uint8) for f in faces]
        descriptors = self._net.compute_face_descriptor(chips)
        return np.asarray([np.asarray(d) for d in descriptors], dtype=np.float32)


__all__ = ["BACKBONE", "ENGINES", "MODEL_FILE", "DlibEncoder"]
