"""IResNet: the improved ResNet of ArcFace (Deng et al., CVPR 2019, section 3.2 / fig. 7).

Differences from the ImageNet ResNet, all for 112×112 faces:

- stem: a 3×3 convolution with stride 1 (no 7×7/stride 2, no max-pool), BN, PReLU, so the
  four stages see 112 → 56 → 28 → 14 → 7;
- improved residual unit ``BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN`` plus a
  shortcut (identity, or 1×1 conv with stride + BN when the shape changes); the stride
  sits on the unit's second convolution and the first unit of every stage has stride 2;
- embedding head "option E": ``BN → Dropout → FC(512·7·7 → D) → BN``.

``input_size`` (a multiple of 16, default 112) runs the same network on smaller crops: the
final map is ``input_size / 16`` (4×4 at 64 px, about a third of the operations) and the
head's FC shrinks with it.

Stages have 64, 128, 256, 512 channels and [2,2,2,2] (IResNet-18), [3,4,6,3] (34),
[3,4,14,3] (50) or [3,13,30,3] (100) units.

Parameters with ``embedding_size=512`` (``sum(p.numel() for p in m.parameters())``; the
arithmetic is in ``tests/models/test_iresnet.py``):

============  ===========  =====================================
model         parameters   of which the head's FC (25088 × 512)
============  ===========  =====================================
IResNet-18    24,025,600   12,845,568
IResNet-34    34,139,328   12,845,568
IResNet-50    43,590,848   12,845,568
IResNet-100   65,156,160   12,845,568
============  ===========  =====================================
"""

from __future__ import annotations

from torch import Tensor, nn

from facemetric.models.registry import INPUT_SIZE, check_face_batch, register_model

STAGE_CHANNELS = (64, 128, 256, 512)
DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IResidualUnit(nn.Module):
    """``BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN`` plus shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_ch, H, W) → (B, out_ch, H/stride, W/stride)``."""
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + self.shortcut(x)


class IResNet(nn.Module):
    """IResNet backbone: ``(B, 3, S, S)`` float → ``(B, embedding_size)``, ``S = input_size``.

    Input: RGB faces aligned to the ArcFace template, normalised as the training recipe
    chooses (commonly ``(x/255 − 0.5)/0.5``). The embedding is not L2-normalised: losses
    and evaluation normalise where their formula says so.

    Args:
        depths: units per stage, e.g. ``(3, 4, 14, 3)``.
        embedding_size: output dimension ``D``.
        dropout: dropout probability in the head (ArcFace used 0 on large data, 0.4 on
            small sets such as CASIA-WebFace).
        zero_init_residual: start every unit's last BN scale at 0, so each unit begins as
            its shortcut (Goyal et al. 2017) — steadier early training of deep models.
        input_size: side of the square input, a multiple of 16 and at least 32 (112, the
            paper's, by default); four stride-2 stages leave an ``input_size / 16`` map.
    """

    def __init__(
        self,
        depths: tuple[int, int, int, int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        input_size: int = INPUT_SIZE,
    ) -> None:
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int):
            raise ValueError(f"input_size must be an int, got {input_size!r}")
        if input_size < 32 or input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16 and >= 32, got {input_size}")
        if len(depths) != 4 or any(d < 1 for d in depths):
            raise ValueError(f"depths must be four positive unit counts, got {depths}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.embedding_size = embedding_size
        self.input_size = input_size
        final_map = input_size // 16
        self.stem = nn.Sequential(
            _conv3x3(3, STAGE_CHANNELS[0]), nn.BatchNorm2d(STAGE_CHANNELS[0]), nn.PReLU(64)
        )
        stages = []
        in_ch = STAGE_CHANNELS[0]
        for out_ch, depth in zip(STAGE_CHANNELS, depths, strict=True):
            units = [IResidualUnit(in_ch, out_ch, stride=2)]
            units += [IResidualUnit(out_ch, out_ch, stride=1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*units))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        last = STAGE_CHANNELS[-1]
        self.head = nn.Sequential(
            nn.BatchNorm2d(last),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(last * final_map * final_map, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.PReLU):
                nn.init.constant_(m.weight, 0.25)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IResidualUnit):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, S, S)`` → ``(B, embedding_size)`` with ``S = input_size``; ``ValueError``
        on other shapes."""
        check_face_batch(x, self.input_size)
        return self.head(self.stages(self.stem(x)))


@register_model("iresnet18")
def iresnet18(
    embedding_size: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    input_size: int = INPUT_SIZE,
) -> IResNet:
    """IResNet-18: units per stage (2, 2, 2, 2); 24,025,600 parameters with a 512-d embedding."""
    return IResNet(DEPTHS[18], embedding_size, dropout, zero_init_residual, input_size)


@register_model("iresnet34")
def iresnet34(
    embedding_size: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    input_size: int = INPUT_SIZE,
) -> IResNet:
    """IResNet-34: units per stage (3, 4, 6, 3); 34,139,328 parameters with a 512-d embedding."""
    return IResNet(DEPTHS[34], embedding_size, dropout, zero_init_residual, input_size)


@register_model("iresnet50")
def iresnet50(
    embedding_size: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    input_size: int = INPUT_SIZE,
) -> IResNet:
    """IResNet-50: units per stage (3, 4, 14, 3); 43,590,848 parameters with a 512-d embedding."""
    return IResNet(DEPTHS[50], embedding_size, dropout, zero_init_residual, input_size)


@register_model("iresnet100")
def iresnet100(
    embedding_size: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    input_size: int = INPUT_SIZE,
) -> IResNet:
    """IResNet-100: units per stage (3, 13, 30, 3); 65,156,160 parameters with a 512-d embedding."""
    return IResNet(DEPTHS[100], embedding_size, dropout, zero_init_residual, input_size)
