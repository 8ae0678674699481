"""A whole dataset through a model, in order: what dataset-level training state (global hard
mining's index, the hierarchical-triplet class tree, magnet's clusters) refreshes from.

:func:`embed_dataset` runs ``model`` in eval mode under ``no_grad`` (its mode restored
afterwards) over ``dataset`` in index order and hands every batch to ``consume``; nothing is
drawn from the global random generators, so a refresh never changes what training draws
next. Items are ``(image, label)``; an ``(H, W, 3)`` array image goes through
``transform(image, rng)`` with ``rng`` seeded by the item's index (a facemetric transform,
e.g. ``eval_transform(112)``), a tensor is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from facemetric.validation import check_embeddings

Transform = Callable[[np.ndarray, np.random.Generator], Tensor]
"""A facemetric transform: ``(image, rng) -> (3, H, W)`` tensor."""


class PreparedDataset(Dataset):
    """``base[i]`` with an array image passed through ``transform(image, rng_i)``,
    ``rng_i = default_rng(i)``; the label as an ``int``."""

    def __init__(self, base: Dataset, transform: Transform | None) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        if isinstance(image, np.ndarray):
            if self.transform is None:
                raise ValueError("the dataset yields arrays: pass a transform (eval_transform)")
            image = self.transform(image, np.random.default_rng(index))
        return image, int(label)


def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    consume: Callable[[Tensor, Tensor], None],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    transform: Transform | None = None,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "embed",
) -> None:
    """Call ``consume(embeddings, labels)`` for every batch of ``dataset`` in order (module
    docstring): ``embeddings`` the model's raw float32 output, detached, on ``device``
    (default: the model's), ``labels`` the batch's labels.

    Raises:
        ValueError: ``batch_size < 1``, or the model returns NaN/Inf.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    loader = DataLoader(
        PreparedDataset(dataset, transform), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, generator=torch.Generator(),
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(loader), unit="batch", desc=desc,
                                   disable=not progress, leave=False) as bar:
            for images, labels in loader:
                out = model(images.to(device, non_blocking=True)).detach().float()
                check_embeddings(out)
                consume(out, labels)
                bar.update(1)
    finally:
        model.train(was_training)


__all__ = ["PreparedDataset", "Transform", "embed_dataset"]
