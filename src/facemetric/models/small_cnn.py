"""A small CNN for tiny faces and fast tests, registered as ``small_cnn``."""

from __future__ import annotations

from torch import Tensor, nn

from facemetric.models.registry import register_model


class SmallFaceCNN(nn.Module):
    """A four-block CNN for small grayscale faces: ``(B, C, H, W) -> (B, embedding_size)``.

    Blocks of 3×3 convolution, batch norm and ReLU (the first three followed by 2×2 max
    pooling), global average pooling, then a linear layer to the embedding. Embeddings are
    not normalised: losses and evaluation normalise where their formula says so. About 60k
    parameters at the defaults; any input of at least 8×8 pixels works.
    """

    def __init__(
        self, embedding_size: int = 64, in_channels: int = 1, width: int = 16
    ) -> None:
        super().__init__()
        if embedding_size < 1 or in_channels < 1 or width < 1:
            raise ValueError(
                "embedding_size, in_channels and width must be positive, got "
                f"{embedding_size}, {in_channels}, {width}"
            )
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(chans[-1], embedding_size)
        self.embedding_size = embedding_size

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.features(x).mean(dim=(2, 3)))


@register_model("small_cnn")
def small_cnn(embedding_size: int = 64, in_channels: int = 3, width: int = 16) -> SmallFaceCNN:
    """:class:`SmallFaceCNN` on RGB input (any size of at least 8×8)."""
    return SmallFaceCNN(embedding_size=embedding_size, in_channels=in_channels, width=width)


__all__ = ["SmallFaceCNN", "small_cnn"]
