"""``load_model(source)``: any model facemetric can use, as an :class:`Encoder`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from facemetric.inference.default import DEFAULT, resolve_default_model
from facemetric.inference.encoder import Encoder

DLIB = "dlib"
"""The ``source`` naming dlib's ResNet face descriptor (``face_recognition_models``)."""


def load_model(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    flip_test: bool | None = None,
) -> Encoder:
    """Load a model for use, with its contract (and its threshold table when calibrated).

    Args:
        source: a training run's output folder (its newest checkpoint), a
            ``checkpoint_*.pt`` file, an exported ``.onnx`` file, ``"dlib"``, or
            ``"default"``: the installed default model
            (:mod:`facemetric.inference.default`).
        device: for checkpoints: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        flip_test: override the flip test (default: on for trained backbones, as stored for
            ONNX files, off for dlib, whose descriptor was trained without it).

    Raises:
        FileNotFoundError: no such file or folder; ``"default"`` with none installed.
        ValueError: a file that is not a model facemetric can read (the message says why).
    """
    if str(source) == DLIB:
        from facemetric.inference.dlib import DlibEncoder

        return DlibEncoder() if flip_test is None else DlibEncoder(flip_test=flip_test)
    if str(source) == DEFAULT:
        source = resolve_default_model()
    path = Path(source)
    if path.suffix.lower() == ".onnx":
        from facemetric.inference.onnx import OnnxEncoder

        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file {path}")
        return OnnxEncoder(path, flip_test=flip_test)
    from facemetric.inference.checkpoint import load_checkpoint_encoder

    return load_checkpoint_encoder(
        path, device=device, flip_test=True if flip_test is None else flip_test
    )


__all__ = ["DEFAULT", "DLIB", "load_model"]
