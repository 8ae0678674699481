"""Read the weights of dlib's ResNet face descriptor from its ``.dat`` file.

``dlib_face_recognition_resnet_model_v1.dat`` (in ``face_recognition_models``) is dlib's own
serialisation of a ``loss_metric`` network. Its grammar, as far as it is read here:

- an integer is one byte ``h`` (low 4 bits: how many little-endian bytes follow; bit 7: the
  sign) and then those bytes; a string is its length (an integer) and its bytes;
- a float or double is two integers, mantissa ``m`` and exponent ``e``: ``m · 2^e``;
- a tensor is a version (1: every value a float as above; 2: raw little-endian float32),
  then ``num_samples, k, nr, nc`` and the values; an alias tensor is version 1 and the four
  sizes, no values;
- every layer starts with its name-and-version string (``"con_4"``, ``"affine_"``,
  ``"fc_2"``, ``"input_rgb_image_sized"`` …) followed by its fields. The wrapping layers
  (``add_layer``, tags, skips) write their subnetwork first, so the layers with weights
  appear in the file from the input to the output.

:func:`read_dlib_descriptor` finds each weighted layer by its length-prefixed name and
checks every field it reads against the shape the network must have, so a different or
damaged file is refused rather than loaded wrongly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DlibFormatError(ValueError):
    """The file is not a dlib metric network this reader understands."""


class _Reader:
    """Sequential reader of dlib's serialised values, starting at ``pos``."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def integer(self) -> int:
        if self.pos >= len(self.data):
            raise DlibFormatError("the file ends inside a value")
        head = self.data[self.pos]
        size = head & 0x0F
        if size > 8 or head & 0x70:
            raise DlibFormatError(f"bad integer header 0x{head:02x} at byte {self.pos}")
        raw = self.data[self.pos + 1 : self.pos + 1 + size]
        if len(raw) != size:
            raise DlibFormatError("the file ends inside an integer")
        self.pos += 1 + size
        value = int.from_bytes(raw, "little")
        return -value if head & 0x80 else value

    def string(self) -> str:
        size = self.integer()
        raw = self.data[self.pos : self.pos + size]
        self.pos += size
        return raw.decode("latin-1")

    def real(self) -> float:
        mantissa = self.integer()
        exponent = self.integer()
        return float(mantissa) * 2.0**exponent

    def tensor(self) -> np.ndarray:
        """A tensor's values as float32 of shape ``(num_samples, k, nr, nc)``."""
        version = self.integer()
        shape = tuple(self.integer() for _ in range(4))
        if any(s < 0 for s in shape):
            raise DlibFormatError(f"negative tensor size {shape}")
        count = int(np.prod(shape))
        if version == 2:
            end = self.pos + 4 * count
            if end > len(self.data):
                raise DlibFormatError("the file ends inside a tensor")
            values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
            self.pos = end
            return values.astype(np.float32).reshape(shape)
        if version == 1:
            return np.array([self.real() for _ in range(count)], np.float32).reshape(shape)
        raise DlibFormatError(f"unknown tensor version {version}")

    def alias(self) -> tuple[int, ...]:
        if self.integer() != 1:
            raise DlibFormatError("unknown alias-tensor version")
        return tuple(self.integer() for _ in range(4))


@dataclass(frozen=True)
class DlibConv:
    """One ``con_`` layer: ``weight`` ``(out, in, kh, kw)`` (cross-correlation, as torch),
    ``bias`` ``(out,)``, ``stride`` and ``padding`` (the same along both axes)."""

    weight: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int


@dataclass(frozen=True)
class DlibAffine:
    """One ``affine_`` layer (a batch norm frozen at the end of training):
    ``y = gamma[c] · x + beta[c]``."""

    gamma: np.ndarray
    beta: np.ndarray


@dataclass(frozen=True)
class DlibDescriptorWeights:
    """Everything :class:`~facemetric.models.dlib_resnet.DlibResNet` needs.

    ``pixel_mean`` are the RGB values the input layer subtracts before dividing by 256;
    ``input_size`` its side (150); ``convs`` and ``affines`` in file order (input → output;
    29 of each); ``fc`` the final ``fc_no_bias`` as a ``(D, 256)`` matrix (torch's
    ``Linear`` layout, the transpose of dlib's).
    """

    pixel_mean: tuple[float, float, float]
    input_size: int
    convs: tuple[DlibConv, ...]
    affines: tuple[DlibAffine, ...]
    fc: np.ndarray


def _offsets(data: bytes, name: str) -> list[int]:
    key = name.encode()
    pattern = re.escape(bytes([0x01, len(key)]) + key)
    return [m.start() for m in re.finditer(pattern, data)]


def _conv(data: bytes, pos: int) -> DlibConv:
    r = _Reader(data, pos)
    r.string()
    params = r.tensor().reshape(-1)
    out_ch, kh, kw = r.integer(), r.integer(), r.integer()
    sy, sx, py, px = r.integer(), r.integer(), r.integer(), r.integer()
    filters = r.alias()
    biases = r.alias()
    if filters[0] != out_ch or filters[2:] != (kh, kw) or biases[1] != out_ch:
        raise DlibFormatError(f"inconsistent con_ layer at byte {pos}: {filters}, {biases}")
    if kh != kw or sy != sx or py != px:
        raise DlibFormatError(f"non-square con_ layer at byte {pos}")
    n_filters = int(np.prod(filters))
    if params.size != n_filters + out_ch:
        raise DlibFormatError(f"con_ layer at byte {pos} has {params.size} values")
    weight = params[:n_filters].reshape(filters).copy()
    bias = params[n_filters:].copy()
    return DlibConv(weight=weight, bias=bias, stride=sy, padding=py)


def _affine(data: bytes, pos: int) -> DlibAffine:
    r = _Reader(data, pos)
    r.string()
    params = r.tensor().reshape(-1)
    gamma_shape, beta_shape = r.alias(), r.alias()
    mode = r.integer()
    channels = int(np.prod(gamma_shape))
    if mode != 0 or gamma_shape != beta_shape or params.size != 2 * channels:
        raise DlibFormatError(f"affine_ layer at byte {pos} is not a per-channel affine")
    return DlibAffine(gamma=params[:channels].copy(), beta=params[channels:].copy())


def read_dlib_descriptor(path: str | os.PathLike[str]) -> DlibDescriptorWeights:
    """Read dlib's ResNet descriptor (``dlib_face_recognition_resnet_model_v1.dat``).

    Raises:
        FileNotFoundError: no such file.
        DlibFormatError: not that network (another layer count, a field that does not fit).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no dlib model file {file}")
    data = file.read_bytes()
    if not data.startswith(b"\x01\x01\x01\x0dloss_metric_"):
        raise DlibFormatError(f"{file} is not a dlib loss_metric network")
    inputs = _offsets(data, "input_rgb_image_sized")
    fcs = _offsets(data, "fc_2")
    if len(inputs) != 1 or len(fcs) != 1:
        raise DlibFormatError(f"{file}: expected one input and one fc layer")
    r = _Reader(data, inputs[0])
    r.string()
    mean = (r.real(), r.real(), r.real())
    rows, cols = r.integer(), r.integer()
    if rows != cols:
        raise DlibFormatError(f"{file}: non-square input {rows}×{cols}")
    convs = tuple(_conv(data, p) for p in _offsets(data, "con_4"))
    affines = tuple(_affine(data, p) for p in _offsets(data, "affine_"))
    r = _Reader(data, fcs[0])
    r.string()
    n_out, n_in = r.integer(), r.integer()
    params = r.tensor().reshape(-1)
    r.alias()
    r.alias()
    no_bias = r.integer()
    if no_bias != 1 or params.size != n_in * n_out:
        raise DlibFormatError(f"{file}: the fc layer is not fc_no_bias<{n_out}> over {n_in}")
    fc = params.reshape(n_in, n_out).T.copy()
    return DlibDescriptorWeights(
        pixel_mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        input_size=rows,
        convs=convs,
        affines=affines,
        fc=fc,
    )


__all__ = [
    "DlibAffine",
    "DlibConv",
    "DlibDescriptorWeights",
    "DlibFormatError",
    "read_dlib_descriptor",
]
