"""MobileFaceNet (Chen, Liu, Gao, Han: "MobileFaceNets: Efficient CNNs for Accurate
Real-Time Face Verification on Mobile Devices", CCBR 2018, table 1).

``(B, 3, 112, 112)`` → conv3×3/2 (64) → depthwise conv3×3 (64) → MobileNetV2 bottlenecks
(expansion t, output c, repeats n, first stride s):

====  ===  ===  ===
t     c    n    s
====  ===  ===  ===
2     64   5    2
4     128  1    2
2     128  6    1
4     128  1    2
2     128  2    1
====  ===  ===  ===

→ conv1×1 (512) → global depthwise conv 7×7 (GDC, linear) → linear conv1×1 (D) → BN.
A bottleneck is ``conv1×1 (expand) → depthwise conv3×3 (stride) → linear conv1×1
(project)``, each with BN, PReLU after the first two, and a residual connection when the
stride is 1 and the channel count is unchanged. Every non-linearity is a PReLU. The GDC
replaces global average pooling: each of the 512 channels learns its own 7×7 weighting
of the final map, so the centre of the face can weigh more than its corners.
``pool="gem"`` puts generalised-mean pooling (:class:`~facemetric.models.pooling.GeM`,
one learnt exponent) in its place, the image-retrieval practice; the linear layer and BN
after it are the "BN-neck" of that practice already.

Parameters (``sum(p.numel() for p in m.parameters())``; arithmetic in
``tests/models/test_mobilefacenet.py``): 1,200,512 with ``embedding_size=512``,
1,003,136 with the paper's 128 (the paper reports 0.99M).
"""

from __future__ import annotations

from torch import Tensor, nn

from facemetric.models.pooling import GeM
from facemetric.models.registry import INPUT_SIZE, check_face_batch, register_model

BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)
"""MobileFaceNet's bottleneck stages as ``(expansion t, channels c, repeats n, stride s)``."""

POOLS = ("gdc", "gem")
"""How the final 512-channel map becomes one vector: the paper's global depthwise
convolution, or generalised-mean pooling."""


def scaled_channels(channels: int, width: float) -> int:
    """``channels × width`` rounded to the nearest multiple of 8 (at least 8): the channel
    count of a stage of a ``width``-times MobileFaceNet (1 gives the paper's)."""
    if isinstance(width, bool) or not isinstance(width, int | float):
        raise ValueError(f"width must be a number, got {width!r}")
    if not 0.25 <= width <= 4.0:
        raise ValueError(f"width must lie in [0.25, 4] (1 is the paper's network), got {width}")
    return max(8, round(channels * width / 8.0) * 8)


def _conv_bn(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    prelu: bool = True,
    padding: int | None = None,
) -> nn.Sequential:
    pad = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if prelu:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: expand 1×1 → depthwise 3×3 (stride) → linear project 1×1."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.residual = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(
            _conv_bn(in_ch, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            _conv_bn(hidden, out_ch, 1, prelu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_ch, H, W) → (B, out_ch, H/stride, W/stride)``."""
        y = self.body(x)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """MobileFaceNet: ``(B, 3, 112, 112)`` float → ``(B, embedding_size)``, not normalised.

    Args:
        embedding_size: output dimension ``D`` (the paper: 128; 512 is the common choice
            when training with ArcFace-style classifiers).
        input_size: side of the square input, a multiple of 16 (default 112, the paper's);
            the global depthwise convolution spans the ``input_size / 16`` final map. A
            smaller side (e.g. 64: about a third of the operations) trades accuracy for
            speed on a CPU budget.
        dropout: dropout probability on the 512 pooled features before the embedding layer
            (0, the paper's, by default; a few tenths regularise training on small sets, as
            ArcFace's 0.4 on CASIA-WebFace).
        pool: ``"gdc"`` (the paper's global depthwise convolution, spatial weights per
            channel) or ``"gem"`` (generalised-mean pooling, one learnt exponent, no spatial
            weights: 26,111 fewer parameters at 112 px).
        width: multiplier of the stem's and the bottlenecks' channels (1, the paper's, by
            default), each rounded to a multiple of 8 (:func:`scaled_channels`); the 512
            channels of the last 1×1 convolution and the GDC stay, so the embedding head is
            the same. insightface's ``mbf`` uses 2 (with its own block counts); the
            pointwise convolutions, most of the operations, grow with its square.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int = INPUT_SIZE,
        dropout: float = 0.0,
        pool: str = "gdc",
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if isinstance(input_size, bool) or not isinstance(input_size, int):
            raise ValueError(f"input_size must be an int, got {input_size!r}")
        if input_size < 32 or input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16 and >= 32, got {input_size}")
        stem = scaled_channels(64, width)  # checks width
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.stem = nn.Sequential(
            _conv_bn(3, stem, 3, stride=2),
            _conv_bn(stem, stem, 3, groups=stem),
        )
        blocks: list[nn.Module] = []
        in_ch = stem
        for t, c, n, s in BOTTLENECKS:
            for i in range(n):
                out_ch = scaled_channels(c, width)
                blocks.append(Bottleneck(in_ch, out_ch, stride=s if i == 0 else 1, expansion=t))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.expand = _conv_bn(in_ch, 512, 1)
        self.pool = pool
        if pool == "gdc":  # the attribute names are the checkpoints' keys
            self.gdc = _conv_bn(512, 512, input_size // 16, groups=512, prelu=False, padding=0)
        else:
            self.gem = GeM()
        self.dropout = nn.Dropout(dropout)  # outside ``embed``: checkpoint keys stay the same
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),  # the paper's linear 1×1 conv
            nn.BatchNorm1d(embedding_size),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.PReLU):
                nn.init.constant_(m.weight, 0.25)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, S, S)`` → ``(B, embedding_size)`` with ``S = input_size``; ``ValueError``
        on other shapes."""
        check_face_batch(x, self.input_size)
        features = self.expand(self.blocks(self.stem(x)))
        pooled = self.gdc(features) if self.pool == "gdc" else self.gem(features)
        return self.embed(self.dropout(pooled))


@register_model("mobilefacenet")
def mobilefacenet(
    embedding_size: int = 512,
    input_size: int = INPUT_SIZE,
    dropout: float = 0.0,
    pool: str = "gdc",
    width: float = 1.0,
) -> MobileFaceNet:
    """MobileFaceNet (Chen et al. 2018); 1,200,512 parameters with a 512-d embedding at 112."""
    return MobileFaceNet(embedding_size, input_size, dropout, pool, width)
