"""Models loaded for use: an :class:`Encoder` turns aligned faces into unit embeddings and
states its :class:`ModelContract`; its :class:`ThresholdTable` maps a false-accept rate to a
decision threshold. Nothing here imports the training package.

``load_model(source)`` reads a training run or checkpoint (backbone only), an exported ONNX
file (onnxruntime), ``"dlib"`` (dlib's ResNet descriptor from ``face_recognition_models``)
or ``"default"`` (the model installed as this machine's default, :mod:`.default`).
"""

import importlib
from typing import Any

# Names resolve on first use (PEP 562), so that code needing only the contract or the
# threshold table (the gallery, JSON readers) does not import torch.
_WHERE = {
    "CALIBRATION_FILE": "calibration",
    "DEFAULT_FARS": "calibration",
    "CalibrationEntry": "calibration",
    "Threshold": "calibration",
    "ThresholdTable": "calibration",
    "all_pair_scores": "calibration",
    "calibrate": "calibration",
    "threshold_at_far": "calibration",
    "TEMPLATES": "contract",
    "ModelContract": "contract",
    "sha256_of_tensors": "contract",
    "EmbeddedFiles": "encoder",
    "Encoder": "encoder",
    "PairEmbeddings": "encoder",
    "TorchEncoder": "encoder",
    "as_face_batch": "encoder",
    "embed_files": "encoder",
    "embed_pairs": "encoder",
    "input_tensor": "encoder",
    "stack_faces": "encoder",
    "DLIB": "load",
    "DEFAULT": "default",
    "install_default_model": "default",
    "installed_default": "default",
    "resolve_default_model": "default",
    "load_model": "load",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'facemetric.inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"facemetric.inference.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT",
    "DEFAULT_FARS",
    "DLIB",
    "TEMPLATES",
    "CalibrationEntry",
    "EmbeddedFiles",
    "Encoder",
    "ModelContract",
    "PairEmbeddings",
    "Threshold",
    "ThresholdTable",
    "TorchEncoder",
    "all_pair_scores",
    "as_face_batch",
    "calibrate",
    "embed_files",
    "embed_pairs",
    "input_tensor",
    "install_default_model",
    "installed_default",
    "load_model",
    "resolve_default_model",
    "sha256_of_tensors",
    "stack_faces",
    "threshold_at_far",
]
