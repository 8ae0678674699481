"""dlib's ResNet face descriptor as a torch module, with or without dlib's weights.

The network behind ``dlib.face_recognition_model_v1`` (King, dlib 19.3, 2017; 99.38% on
LFW View 2 as published) is a 29-convolution ResNet on 150×150 RGB chips:

- stem: ``conv7×7/2 (32, no padding) → affine → ReLU → max-pool 3×3/2 (no padding)``;
- 14 residual units ``conv3×3/s → affine → ReLU → conv3×3/1 → affine``, plus the input, then
  ReLU: 3 units of 32 channels, then 4 of 64, 3 of 128, 3 of 256 and one more of 256, the
  first unit of each of the last four groups with stride 2. A stride-2 convolution has no
  padding (dlib's default), and its shortcut is a 2×2/2 average pool of the unit's input;
- when the two branches differ in size — more channels, or 3×3 against the pool's 4×4 —
  dlib's ``add_prev`` adds them into a tensor of the larger size, the smaller one
  zero-padded at the end of each axis (:class:`DlibResidualUnit`);
- head: global average pool, ``fc_no_bias`` to 128. No normalisation: dlib compares raw
  descriptors by Euclidean distance; facemetric's encoders normalise rows and use cosine.

Input: dlib subtracts the RGB means ``(122.782, 117.001, 104.298)`` (read from the file)
from 0–255 pixels and divides by 256. The module takes what every facemetric backbone takes,
``x / 127.5 − 1`` (the contract's default ``mean = std = 0.5``), and turns it into dlib's
scaling itself (``pixel_mean`` buffer), so training, the encoders and ONNX export need
nothing special.

The "affine" layers are dlib's batch norms frozen after training (``y = γ·x + β`` per
channel); here they are :class:`ChannelAffine` modules with learnable ``γ, β``, so the
network can be fine-tuned (e.g. as a distillation student initialised from the teacher,
at a smaller input size), but it has no batch statistics.

:func:`dlib_resnet` builds it; with ``weights="dlib"`` (or a path) it loads dlib's file
through :func:`facemetric.models.dlib_file.read_dlib_descriptor`. The port reproduces
dlib's own descriptors (``tests/models/test_dlib_resnet.py`` compares them on real faces).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemetric.models.dlib_file import DlibDescriptorWeights, read_dlib_descriptor
from facemetric.models.registry import check_face_batch, register_model

DLIB_INPUT_SIZE = 150
DLIB_EMBEDDING_SIZE = 128
DLIB_PIXEL_MEAN = (122.782, 117.001, 104.298)
"""The RGB means of dlib's input layer (the file's values replace these when loaded)."""

STEM_CHANNELS = 32
UNITS: tuple[tuple[int, int], ...] = (
    (32, 1), (32, 1), (32, 1),
    (64, 2), (64, 1), (64, 1), (64, 1),
    (128, 2), (128, 1), (128, 1),
    (256, 2), (256, 1), (256, 1),
    (256, 2),
)  # fmt: skip
"""``(channels, stride)`` of the 14 residual units, input to output."""

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
"""The descriptor's weights in ``face_recognition_models``."""
MIN_INPUT_SIZE = 103
"""The smallest input :class:`DlibResNet` takes (:func:`final_map_size` is 0 below it)."""


def stem_side(input_size: int) -> int:
    """Side of the map after the stem's 7×7/2 convolution and 3×3/2 max pool."""
    return ((input_size - 7) // 2 + 1 - 3) // 2 + 1


def branch_sides(side: int, stride: int) -> tuple[int, int]:
    """``(convolution branch, shortcut)`` output sides of a unit fed a ``side`` map: at
    stride 2 a padding-free 3×3/2 convolution and a 2×2/2 average pool, which differ for
    odd sides (``(side − 1) // 2`` vs ``side // 2``); dlib's addition takes the larger."""
    if stride == 1:
        return side, side
    return (side - 3) // 2 + 1, side // 2


def final_map_size(input_size: int) -> int:
    """Side of the last unit's output map for a square input (2 at 150 px, 1 at 112 px);
    0 where a stride-2 convolution would get a map smaller than its 3×3 kernel."""
    side = stem_side(input_size)
    for _, stride in UNITS:
        if stride == 2 and side < 3:
            return 0
        side = max(branch_sides(side, stride))
    return side


class ChannelAffine(nn.Module):
    """``y = γ[c]·x + β[c]``: dlib's ``affine`` layer (a batch norm frozen at inference)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Conv2d:
    """dlib's ``con_``: padding ``kernel // 2`` at stride 1, none otherwise; with bias."""
    return nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0
    )


class DlibResidualUnit(nn.Module):
    """``relu(pad(affine(conv(relu(affine(conv_s(x)))))) + pad(shortcut(x)))``, where the
    shortcut is ``x`` at stride 1 and a 2×2/2 average pool of ``x`` at stride 2, and ``pad``
    zero-pads each branch at the end of the channel and spatial axes to the larger of the
    two (dlib's ``add_prev``). The paddings are fixed by ``in_side``, the side of the
    square map the unit is fed (:func:`branch_sides`), so the graph has no shape tests and
    exports to ONNX as it runs.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, in_side: int) -> None:
        super().__init__()
        self.conv1 = _conv(in_ch, out_ch, 3, stride)
        self.affine1 = ChannelAffine(out_ch)
        self.conv2 = _conv(out_ch, out_ch, 3, 1)
        self.affine2 = ChannelAffine(out_ch)
        self.shortcut: nn.Module = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        if stride == 1 and in_ch != out_ch:
            raise ValueError("a stride-1 unit keeps its channel count")
        conv_side, short_side = branch_sides(in_side, stride)
        self.out_side = max(conv_side, short_side)
        grow = self.out_side - conv_side
        self.branch_pad = (0, grow, 0, grow) if grow else ()
        grow = self.out_side - short_side
        self.shortcut_pad = (0, grow, 0, grow, 0, out_ch - in_ch) if grow or out_ch > in_ch else ()

    def forward(self, x: Tensor) -> Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = self.shortcut(x)
        if self.branch_pad:
            y = F.pad(y, self.branch_pad)
        if self.shortcut_pad:
            shortcut = F.pad(shortcut, self.shortcut_pad)
        return F.relu(y + shortcut)


class DlibResNet(nn.Module):
    """dlib's 29-layer ResNet descriptor (module docstring).

    Args:
        embedding_size: output size of the final bias-free linear layer (128 in dlib).
        input_size: side of the square input; dlib's is 150. Smaller sizes work (the
            zero-padded additions absorb the odd map sizes) down to 103
            (:data:`MIN_INPUT_SIZE`), where the last unit's convolution still fits.
    """

    def __init__(
        self, embedding_size: int = DLIB_EMBEDDING_SIZE, input_size: int = DLIB_INPUT_SIZE
    ) -> None:
        super().__init__()
        if final_map_size(input_size) < 1:
            raise ValueError(
                f"input_size must be ≥ {MIN_INPUT_SIZE} for dlib's ResNet (its last 3×3 "
                f"convolution needs a 3×3 map), got {input_size}"
            )
        self.input_size = input_size
        self.embedding_size = embedding_size
        self.stem = _conv(3, STEM_CHANNELS, 7, 2)
        self.stem_affine = ChannelAffine(STEM_CHANNELS)
        self.pool = nn.MaxPool2d(3, 2)
        units = []
        channels, side = STEM_CHANNELS, stem_side(input_size)
        for out_ch, stride in UNITS:
            units.append(DlibResidualUnit(channels, out_ch, stride, side))
            channels, side = out_ch, units[-1].out_side
        self.units = nn.Sequential(*units)
        self.fc = nn.Linear(channels, embedding_size, bias=False)
        self.register_buffer("pixel_mean", torch.tensor(DLIB_PIXEL_MEAN).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        check_face_batch(x, self.input_size)
        x = ((x + 1.0) * 127.5 - self.pixel_mean) / 256.0  # facemetric's scaling → dlib's
        x = self.pool(F.relu(self.stem_affine(self.stem(x))))
        x = self.units(x)
        return self.fc(x.mean(dim=(2, 3)))

    def load_dlib(self, weights: DlibDescriptorWeights) -> None:
        """Copy dlib's weights in (convolutions and affines in file order, the fc).

        Raises:
            ValueError: the weights do not fit this network (another layer count or shape).
        """
        convs = [self.stem] + [c for u in self.units for c in (u.conv1, u.conv2)]
        affines = [self.stem_affine] + [a for u in self.units for a in (u.affine1, u.affine2)]
        if len(weights.convs) != len(convs) or len(weights.affines) != len(affines):
            raise ValueError(
                f"dlib file has {len(weights.convs)} convolutions and {len(weights.affines)} "
                f"affines; this network has {len(convs)} of each"
            )
        with torch.no_grad():
            for module, conv in zip(convs, weights.convs, strict=True):
                if (
                    tuple(module.weight.shape) != conv.weight.shape
                    or module.stride[0] != conv.stride
                ):
                    raise ValueError(
                        f"dlib convolution {conv.weight.shape}/{conv.stride} does not fit "
                        f"{tuple(module.weight.shape)}/{module.stride[0]}"
                    )
                if module.padding[0] != conv.padding:
                    raise ValueError(f"dlib padding {conv.padding} ≠ {module.padding[0]}")
                module.weight.copy_(torch.from_numpy(conv.weight))
                assert module.bias is not None
                module.bias.copy_(torch.from_numpy(conv.bias))
            for module, affine in zip(affines, weights.affines, strict=True):
                if module.weight.shape[0] != affine.gamma.size:
                    raise ValueError(
                        f"dlib affine of {affine.gamma.size} ≠ {module.weight.shape[0]}"
                    )
                module.weight.copy_(torch.from_numpy(affine.gamma))
                module.bias.copy_(torch.from_numpy(affine.beta))
            if tuple(self.fc.weight.shape) != weights.fc.shape:
                raise ValueError(
                    f"dlib's fc is {weights.fc.shape}, this network's "
                    f"{tuple(self.fc.weight.shape)}: load dlib's weights with embedding_size=128"
                )
            self.fc.weight.copy_(torch.from_numpy(weights.fc))
            self.pixel_mean.copy_(torch.tensor(weights.pixel_mean).view(1, 3, 1, 1))


def dlib_model_path() -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` from ``face_recognition_models``."""
    from facemetric.align.detect import model_file

    return Path(model_file(MODEL_FILE))


@register_model("dlib_resnet")
def dlib_resnet(
    embedding_size: int = DLIB_EMBEDDING_SIZE,
    input_size: int = DLIB_INPUT_SIZE,
    weights: str | None = None,
) -> DlibResNet:
    """dlib's ResNet; ``weights="dlib"`` loads ``face_recognition_models``' file, a path
    another copy of it, ``None`` leaves torch's initialisation. dlib trained it on
    ``dlib150`` chips; fine-tuned, it also serves ``arcface112`` crops (docs/distillation.md)."""
    model = DlibResNet(embedding_size=embedding_size, input_size=input_size)
    if weights is not None:
        path = dlib_model_path() if weights == "dlib" else Path(weights)
        model.load_dlib(read_dlib_descriptor(path))
    return model


__all__ = [
    "DLIB_EMBEDDING_SIZE",
    "DLIB_INPUT_SIZE",
    "DLIB_PIXEL_MEAN",
    "MIN_INPUT_SIZE",
    "ChannelAffine",
    "DlibResNet",
    "DlibResidualUnit",
    "branch_sides",
    "dlib_model_path",
    "dlib_resnet",
    "final_map_size",
    "stem_side",
]
