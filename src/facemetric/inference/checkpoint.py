"""A training run's backbone, loaded for use — and nothing else of the run.

A training checkpoint holds the backbone, the loss's class centres (for Partial FC at a
million identities: gigabytes), the optimiser state and RNG states. For inference only the
backbone matters: the file is opened with ``torch.load(mmap=True, weights_only=True)`` so its
tensors are memory-mapped, and only the ``model`` entries are copied into the network —
the class centres and optimiser moments are never read into memory. ``weights_only=True``
never unpickles code.

The backbone is rebuilt from the run's stored configuration (``[model]`` name, embedding
size and options; ``[data] image_size``) through :mod:`facemetric.models`, without importing
the training package. A run folder's ``calibration.json`` (written by ``facemetric
calibrate``) is attached when it was calibrated for these weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facemetric.inference.calibration import CALIBRATION_FILE, ThresholdTable
from facemetric.inference.contract import ModelContract, sha256_of_tensors
from facemetric.inference.encoder import TorchEncoder

_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")


def newest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The ``checkpoint_<step>.pt`` with the highest step in ``run_dir``, or ``None``."""
    found = []
    for path in Path(run_dir).iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def resolve_checkpoint(source: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or the newest one of a run folder.

    Raises:
        FileNotFoundError: no such file, or a folder without checkpoints.
    """
    path = Path(source)
    if path.is_dir():
        found = newest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no checkpoint_*.pt file: pass a training run's output folder, "
                "a checkpoint file, an exported .onnx file or 'dlib'"
            )
        return found
    if not path.is_file():
        raise FileNotFoundError(f"no model file or run folder {path}")
    return path


def read_backbone(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                          int]:
    """``(backbone state dict, stored training config dict, step)`` of a checkpoint, reading
    only the backbone's tensors (module docstring).

    Raises:
        ValueError: not a facemetric training checkpoint.
    """
    path = Path(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:  # mmap needs the zip format; old or foreign files
            if "mmap" not in str(err).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/zip/pickle signal a damaged file with many types
        raise ValueError(f"{path} is not a readable torch checkpoint: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(
            f"{path} is not a facemetric training checkpoint (no 'model' weights and 'config')"
        )
    weights = {k: v.clone() for k, v in state["model"].items()}
    config = state["config"]
    step = int(state.get("step", 0))
    del state  # drops the memory map: centres and optimiser state were never read
    return weights, config, step


def model_section(config: dict[str, Any], source: str | os.PathLike[str]) -> tuple[
        str, int, dict[str, Any], int]:
    """``(backbone name, embedding size, backbone options, image size)`` from a stored
    training configuration; ``source`` names the file in the error.

    Raises:
        ValueError: the configuration lacks ``[model]`` or ``[data] image_size``.
    """
    try:
        model = config["model"]
        return (str(model["name"]), int(model["embedding_size"]), dict(model.get("options", {})),
                int(config["data"]["image_size"]))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{source}: the stored configuration lacks [model]/[data] {err}") from err


def rebuild_backbone(
    weights: dict[str, torch.Tensor], config: dict[str, Any], source: str | os.PathLike[str]
) -> nn.Module:
    """The backbone a stored training configuration describes, with ``weights`` loaded.

    Raises:
        ValueError: the configuration lacks ``[model]``/``[data]``, names a backbone or an
            option that does not exist, or does not fit the weights.
    """
    from facemetric.models import build_model

    name, dim, options, _ = model_section(config, source)
    try:
        model = build_model(name, dim, **options)
        model.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source}: cannot rebuild the backbone {name!r}: {err}") from err
    return model


def load_checkpoint_encoder(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    flip_test: bool = True,
    channels_last: bool = True,
) -> TorchEncoder:
    """A :class:`TorchEncoder` for a training checkpoint or run folder (module docstring).

    Its ``thresholds`` attribute is the run's threshold table when ``calibration.json``
    beside the checkpoint was calibrated for these weights and this flip-test setting,
    else ``None``.
    """
    path = resolve_checkpoint(source)
    weights, config, step = read_backbone(path)
    name, dim, options, image_size = model_section(config, path)
    model = rebuild_backbone(weights, config, path)
    contract = ModelContract(
        backbone=name,
        input_size=image_size,
        template="arcface112",
        embedding_size=dim,
        weights_sha256=sha256_of_tensors(weights),
        flip_test=flip_test,
        source="checkpoint",
        extra={
            "checkpoint": str(path),
            "step": step,
            "loss": str(config.get("loss", {}).get("name", "")),
            "model_options": options,
        },
    )
    encoder = TorchEncoder(model.eval(), contract, device=device, channels_last=channels_last)
    encoder.thresholds = find_calibration(path.parent, contract.fingerprint())
    return encoder


def find_calibration(folder: Path, fingerprint: str) -> ThresholdTable | None:
    """``folder/calibration.json`` if it was calibrated for ``fingerprint``, else ``None``."""
    file = folder / CALIBRATION_FILE
    if not file.is_file():
        return None
    table = ThresholdTable.from_json(file.read_text(encoding="utf-8"))
    return table if table.model_fingerprint == fingerprint else None


__all__ = [
    "find_calibration",
    "load_checkpoint_encoder",
    "model_section",
    "newest_checkpoint",
    "read_backbone",
    "rebuild_backbone",
    "resolve_checkpoint",
]
