"""The interface every presentation-attack detector implements, its input contract, and
the saved format (JSON + a weights file: no pickle).

A detector scores *context crops*: the detected face box grown by ``margin`` box sides on
every side (clipped to the photo) and shrunk to at most ``max_side`` pixels — exactly what
:func:`facemetric.recognizer.faces.context_crop` cuts and what
:class:`~facemetric.recognizer.faces.FoundFace` keeps as ``.crop`` (margin 0.5, so the crop
is twice the face box, at most 224 px). The context matters: a print attack often shows
the paper's edge, the fingers holding it, or the flat lighting of a photo around the face.

``score(crops)`` returns one *attack probability* per crop (higher = more likely an attack);
``is_attack(crops)`` compares it with the detector's ``threshold``, which was chosen on the
subjects the detector was trained on (never on the ones it is evaluated on) and is saved
with it, with the rule that chose it.

Saved layout of a detector folder::

    pad.json      format, kind, threshold (+ rule and its training-subject errors),
                  input contract, configuration, training provenance,
                  weights file name and SHA-256
    <weights>     lbp.npz (numpy, no object arrays) or cnn.pt (a torch state dict read with
                  ``weights_only=True``)
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from facemetric.atomic import atomic_write_text

FORMAT = "facemetric-pad"
FORMAT_VERSION = 1
MANIFEST = "pad.json"


@dataclass(frozen=True)
class PadInput:
    """The input contract: a context crop of the face (module docstring).

    Attributes:
        margin: box sides added on every side of the detected face box (0.5: the crop is
            twice the box), as :func:`~facemetric.recognizer.faces.context_crop` cuts it.
        max_side: the crop's longer side is shrunk to at most this many pixels.
        detector: the face detector the training crops came from (dlib ``"hog"``).
    """

    margin: float = 0.5
    max_side: int = 224
    detector: str = "hog"

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin <= 2.0 or self.max_side < 16:
            raise ValueError(f"a PAD input needs 0 <= margin <= 2 and max_side >= 16, got "
                             f"margin={self.margin}, max_side={self.max_side}")

    @property
    def face_fraction(self) -> float:
        """The face box's share of the crop's side when the crop is not clipped:
        ``1 / (1 + 2·margin)``."""
        return 1.0 / (1.0 + 2.0 * self.margin)

    def crop(self, image: np.ndarray, box: tuple[int, int, int, int],
             landmarks: np.ndarray) -> np.ndarray:
        """Cut this contract's crop from a full RGB photo and a detected face box."""
        from facemetric.recognizer.faces import context_crop

        return context_crop(image, box, landmarks, self.margin, self.max_side)[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_crops(crops: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The crops as a list of ``(H, W, 3)`` uint8 RGB arrays (grey ``(H, W)`` is replicated).

    Raises:
        ValueError: a crop of another dtype or shape, or smaller than 8 × 8 pixels.
    """
    if isinstance(crops, np.ndarray) and crops.ndim in (2, 3) and crops.dtype == np.uint8 and (
            crops.ndim == 2 or crops.shape[2] == 3):
        raise ValueError("score() takes a sequence of crops; wrap a single crop in a list")
    out = []
    for i, crop in enumerate(crops):
        a = np.asarray(crop)
        if a.dtype != np.uint8:
            raise ValueError(f"crop {i}: PAD detectors take uint8 RGB crops, got {a.dtype}")
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 8:
            raise ValueError(f"crop {i}: expected an (H, W, 3) RGB array of at least 8×8 pixels, "
                             f"got shape {a.shape}")
        out.append(a)
    return out


class PadDetector(ABC):
    """A presentation-attack detector (module docstring).

    Attributes:
        threshold: attack when ``score >= threshold``; chosen on the training subjects.
        input: the :class:`PadInput` contract of the crops it scores.
        info: provenance — training subjects and counts, the threshold rule and the
            errors it gave on the training subjects, wall time.
    """

    kind: ClassVar[str] = ""
    weights_file: ClassVar[str] = ""

    def __init__(self, threshold: float, pad_input: PadInput | None = None,
                 info: dict[str, Any] | None = None) -> None:
        if not np.isfinite(threshold):
            raise ValueError(f"a PAD threshold must be finite, got {threshold}")
        self.threshold = float(threshold)
        self.input = pad_input or PadInput()
        self.info: dict[str, Any] = dict(info or {})

    @abstractmethod
    def score(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Attack probability of each context crop: ``(n,)`` float64 in ``[0, 1]``."""

    def is_attack(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """``score(crops) >= threshold``: ``(n,)`` bool."""
        return self.score(crops) >= self.threshold

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The configuration that rebuilds the detector around its weights."""

    @abstractmethod
    def _write_weights(self, path: Path) -> None:
        """Write the weights to ``path`` (atomically)."""

    @classmethod
    @abstractmethod
    def _from_saved(cls, manifest: dict[str, Any], weights: Path) -> PadDetector:
        """Rebuild from a manifest and its (checked) weights file."""

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/pad.json`` and the weights file; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / self.weights_file
        self._write_weights(weights)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "threshold": self.threshold,
            "input": self.input.to_dict(),
            "config": self.config_dict(),
            "info": self.info,
            "weights": {"file": self.weights_file, "sha256": _sha256(weights)},
        }
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, default=_json))
        return folder

    def describe(self) -> str:
        return (f"{self.kind} PAD detector, threshold {self.threshold:.4g}, input: context "
                f"crop margin {self.input.margin}, ≤ {self.input.max_side} px")


def _json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in pad.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _registry() -> dict[str, type[PadDetector]]:
    from facemetric.pad.cnn import CnnDetector
    from facemetric.pad.lbp import LbpDetector

    return {LbpDetector.kind: LbpDetector, CnnDetector.kind: CnnDetector}


def load_detector(folder: str | Path) -> PadDetector:
    """Load a detector saved by :meth:`PadDetector.save`.

    Raises:
        FileNotFoundError: no ``pad.json`` or weights file in ``folder``.
        ValueError: not a facemetric PAD folder, an unknown kind or version, or weights
            whose SHA-256 differs from the manifest's (a damaged or replaced file).
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} not found: pass the folder `facemetric pad train --out` wrote")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}): retrain the detector "
                         "with `facemetric pad train`") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} is not a facemetric PAD detector (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path} has format version {manifest.get('version')!r}; "
                         f"this facemetric reads version {FORMAT_VERSION}: retrain it")
    kinds = _registry()
    kind = manifest.get("kind")
    if kind not in kinds:
        raise ValueError(f"{manifest_path}: unknown detector kind {kind!r}; known: "
                         f"{sorted(kinds)}")
    weights = folder / str(manifest["weights"]["file"])
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} (named in {manifest_path}) is missing")
    if _sha256(weights) != manifest["weights"]["sha256"]:
        raise ValueError(f"{weights} does not match the SHA-256 recorded in {manifest_path}: "
                         "the file was changed or damaged; retrain or restore the detector")
    return kinds[kind]._from_saved(manifest, weights)


__all__ = ["FORMAT", "MANIFEST", "PadDetector", "PadInput", "check_crops", "load_detector"]
