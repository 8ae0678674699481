"""The model contract: what an encoder expects and promises, stated once and stored with it.

A face embedding is only meaningful together with the exact way it was computed: which
network (and which weights), which face alignment, which input size and pixel
normalisation, whether the mirror image was added (flip test). Two galleries built with
different contracts hold incomparable vectors; a threshold calibrated for one model is
meaningless for another. :class:`ModelContract` records all of it; its
:meth:`~ModelContract.fingerprint` is a SHA-256 over the fields that change the numbers, so a
gallery can pin the model it was built with and refuse another.

Input of every encoder: aligned faces, ``(n, T, T, 3)`` uint8 RGB at the *template's* size
``T`` (``arcface112``: 112, the 5-point ArcFace template; ``dlib150``: dlib's 150×150 chip
with padding 0.25). The encoder resizes to ``input_size`` (area interpolation when
shrinking, as training's eval transform does) and normalises each channel as
``(x / 255 − mean) / std``. Output: ``(n, embedding_size)`` float32 rows of unit norm; with
``flip_test`` the embedding is ``normalise(f(x) + f(mirror(x)))``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

TEMPLATES: dict[str, int] = {"arcface112": 112, "dlib150": 150}
"""Alignment templates an encoder can ask for, with the side of their square crop."""

_IDENTITY_FIELDS = (
    "backbone",
    "input_size",
    "template",
    "mean",
    "std",
    "embedding_size",
    "flip_test",
    "weights_sha256",
)


@dataclass(frozen=True)
class ModelContract:
    """What an encoder takes and returns (see the module docstring).

    Attributes:
        backbone: the network's registered name (``"mobilefacenet"``, ``"iresnet50"``,
            ``"dlib_resnet_v1"`` ...).
        input_size: side of the square input the network runs on (after resizing).
        template: alignment template of the input faces, a key of :data:`TEMPLATES`.
        mean, std: pixel normalisation ``(x / 255 − mean) / std``, one value per RGB channel.
        embedding_size: ``D``, the length of an embedding.
        flip_test: whether the embedding is the normalised sum of the face's and its mirror
            image's.
        weights_sha256: SHA-256 of the weights (hex), so two copies of one model agree and
            two models never do.
        source: where the encoder came from (``"checkpoint"``, ``"onnx"``, ``"dlib"``);
            informative, not part of the fingerprint (an ONNX export of a checkpoint makes
            the same embeddings).
        extra: free-form JSON-safe facts (training step, loss, export time ...), not part of
            the fingerprint.
    """

    backbone: str
    input_size: int
    template: str
    embedding_size: int
    weights_sha256: str
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    flip_test: bool = True
    source: str = "checkpoint"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(
                f"unknown alignment template {self.template!r}; choose one of {sorted(TEMPLATES)}"
            )
        if self.input_size < 1 or self.embedding_size < 1:
            raise ValueError(
                f"input_size and embedding_size must be positive, got {self.input_size}, "
                f"{self.embedding_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values, std > 0; got {self.mean}, {self.std}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def template_size(self) -> int:
        """Side of the aligned crops the encoder takes (``TEMPLATES[template]``)."""
        return TEMPLATES[self.template]

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the fields that change the embeddings (not ``source``/``extra``)."""
        ident = {name: getattr(self, name) for name in _IDENTITY_FIELDS}
        text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary (lists for tuples), with the fingerprint."""
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["fingerprint"] = self.fingerprint()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelContract:
        """Inverse of :meth:`to_dict`; a stored fingerprint must match the fields.

        Raises:
            ValueError: missing or unknown fields, or a fingerprint that does not match.
        """
        if not isinstance(raw, dict):
            raise ValueError(f"a model contract must be a JSON object, got {type(raw).__name__}")
        data = dict(raw)
        stored = data.pop("fingerprint", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model-contract fields {unknown}; expected {sorted(names)}")
        try:
            contract = cls(
                **{
                    **data,
                    "mean": tuple(data.get("mean", (0.5, 0.5, 0.5))),
                    "std": tuple(data.get("std", (0.5, 0.5, 0.5))),
                    "extra": dict(data.get("extra", {})),
                }
            )
        except TypeError as err:
            raise ValueError(f"incomplete model contract: {err}") from err
        if stored is not None and stored != contract.fingerprint():
            raise ValueError(
                "the model contract's stored fingerprint does not match its fields: the file "
                "was edited or corrupted"
            )
        return contract

    @classmethod
    def from_json(cls, text: str) -> ModelContract:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"the model contract is not valid JSON: {err}") from err
        return cls.from_dict(raw)

    def describe(self) -> str:
        """One line for a person."""
        return (
            f"{self.backbone} ({self.source}), {self.template} faces → {self.input_size} px, "
            f"D={self.embedding_size}, flip test {'on' if self.flip_test else 'off'}, "
            f"weights {self.weights_sha256[:12]}"
        )


def sha256_of_tensors(state: dict[str, Any]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes, in sorted name order:
    the same weights give the same digest whatever file they came from."""
    import numpy as np
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        digest.update(np.ascontiguousarray(t.numpy()).tobytes())
    return digest.hexdigest()


__all__ = ["TEMPLATES", "ModelContract", "sha256_of_tensors"]
