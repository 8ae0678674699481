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

from facemetric.data.transforms import Resize
from facemetric.inference.contract import ModelContract
from facemetric.inference.encoder import Encoder

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
"""The descriptor's weights in ``face_recognition_models``."""

BACKBONE = "dlib_resnet_v1"
CHIP_SIZE = 150
EMBEDDING_SIZE = 128


@functools.cache
def _load(path: str) -> tuple[Any, str]:
    """``(dlib.face_recognition_model_v1, SHA-256 of the file)``, once per process."""
    from facemetric.align.detect import _dlib

    dlib = _dlib()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return dlib.face_recognition_model_v1(path), digest.hexdigest()


class DlibEncoder(Encoder):
    """dlib's 128-d ResNet face descriptor on ``dlib150`` chips (module docstring).

    Args:
        flip_test: add the mirror image's descriptor before normalising (off by default).
        model_path: another copy of ``dlib_face_recognition_resnet_model_v1.dat``; by default
            the one in ``face_recognition_models``.

    Raises:
        ImportError: dlib or ``face_recognition_models`` is missing (with the install hint).

    dlib does not promise safe concurrent calls on one network: use one encoder per thread
    or processes.
    """

    def __init__(
        self, flip_test: bool = False, model_path: str | os.PathLike[str] | None = None
    ) -> None:
        if model_path is None:
            from facemetric.align.detect import model_file

            path = model_file(MODEL_FILE)
        else:
            path = Path(model_path)
            if not path.is_file():
                raise FileNotFoundError(f"no dlib descriptor model file {path}")
        self.model_path = path.resolve()
        self._net, sha = _load(str(self.model_path))
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
            extra={"model_file": str(self.model_path)},
        )

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        """``(b, T, T, 3)`` uint8 chips → ``(b, 128)`` raw descriptors (dlib's batch call);
        chips of another size are resized to 150×150 first (area when shrinking). Resizing
        does not re-align: an ``arcface112`` crop is framed differently from dlib's chip
        and gives worse descriptors; make ``dlib150`` chips with ``warp_to_template``."""
        if faces.shape[1:3] != (CHIP_SIZE, CHIP_SIZE):
            resize = Resize(CHIP_SIZE)
            rng = np.random.default_rng(0)
            faces = np.stack([resize(f, rng) for f in faces])
        chips = [np.ascontiguousarray(f, dtype=np.uint8) for f in faces]
        if not chips:
            return np.zeros((0, EMBEDDING_SIZE), dtype=np.float32)
        descriptors = self._net.compute_face_descriptor(chips)
        return np.asarray([np.asarray(d) for d in descriptors], dtype=np.float32)


__all__ = ["BACKBONE", "MODEL_FILE", "DlibEncoder"]
