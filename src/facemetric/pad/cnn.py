"""A small CNN presentation-attack detector on the face with its context.

Input: the context crop (the face box grown by half a box on every side, so the face with
one box of context: twice the box), resized to ``input_size`` (112) RGB, normalised as
``(x/255 − 0.5)/0.5``. Network: ``len(widths)`` blocks of 3×3 convolution, batch norm,
ReLU and 2×2 max pooling, global average pooling, dropout, and one linear unit: the attack
logit; ``score = σ(logit)``. 61k parameters at the default widths (16, 32, 64, 64),
≈ 40 M multiply-adds per face.

Training (CPU, minutes): class-balanced binary cross-entropy, AdamW, cosine learning rate,
a fixed number of epochs. Augmentation is mild and keeps the print cues (paper texture,
moiré, edges, colour of a print): a random crop of 80–100 % of the area with aspect
0.9–1.1 resized to the input size (never upscaled by more than 1/√0.8 ≈ 1.12), a
horizontal flip, brightness and contrast ×[0.85, 1.15]; **no** blur, noise or JPEG
re-compression, which would wash out the very texture a print differs by.

Threshold: ``val_subjects`` of the training subjects are held out of the gradient steps;
the threshold is chosen on their scores (:func:`~facemetric.evaluation.pad.select_threshold`)
— scores of people the network never saw, as at test time. With ``val_subjects=0`` it is
chosen on the training scores, which are optimistic (recorded in ``info``).

Weights are a plain state dict (``cnn.pt``), read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from facemetric.atomic import atomic_write
from facemetric.pad.base import PadDetector, PadInput, check_crops


class PadCNN(nn.Module):
    """``(B, 3, S, S)`` normalised crops → ``(B,)`` attack logits (module docstring)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 64), dropout: float = 0.2) -> None:
        super().__init__()
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive channel counts, got {tuple(widths)}")
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x).mean(dim=(2, 3)))).squeeze(1)


@dataclass(frozen=True)
class CnnConfig:
    """Network, preprocessing and training settings (module docstring)."""

    input_size: int = 112
    widths: tuple[int, ...] = (16, 32, 64, 64)
    dropout: float = 0.2
    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: float = 0.5
    jitter: float = 0.15
    val_subjects: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_size < 16 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("input_size must be >= 16, epochs and batch_size >= 1, got "
                             f"{self.input_size}, {self.epochs}, {self.batch_size}")
        if self.val_subjects < 0:
            raise ValueError(f"val_subjects must be >= 0, got {self.val_subjects}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CnnConfig:
        d = dict(d)
        d["widths"] = tuple(int(w) for w in d["widths"])
        d["crop_scale"] = tuple(float(s) for s in d["crop_scale"])
        return cls(**d)


def _eval_ops(config: CnnConfig) -> Callable[[np.ndarray, np.random.Generator], Tensor]:
    from facemetric.data.transforms import Compose, Resize, ToTensor

    return Compose([Resize(config.input_size), ToTensor()])


def augmentation(config: CnnConfig) -> Callable[[np.ndarray, np.random.Generator], Tensor]:
    """The training augmentation (module docstring), ending in a normalised tensor."""
    from facemetric.data.transforms import (
        ColorJitter,
        Compose,
        HorizontalFlip,
        RandomResizedCrop,
        ToTensor,
    )

    return Compose([
        RandomResizedCrop(config.input_size, scale=config.crop_scale, ratio=(0.9, 1.1)),
        HorizontalFlip(config.flip),
        ColorJitter(brightness=config.jitter, contrast=config.jitter),
        ToTensor(),
    ])


class CnnDetector(PadDetector):
    """:class:`PadCNN` on context crops; ``score = σ(logit)`` (module docstring)."""

    kind = "cnn"
    weights_file = "cnn.pt"

    def __init__(self, network: PadCNN, config: CnnConfig, threshold: float,
                 pad_input: PadInput | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(threshold, pad_input, info)
        self.network = network.eval()
        self.config = config
        self._prepare = _eval_ops(config)

    def batch(self, crops: Sequence[np.ndarray]) -> Tensor:
        """The normalised ``(n, 3, S, S)`` input tensor of the crops."""
        rng = np.random.default_rng(0)  # unused by the deterministic eval ops
        return torch.stack([self._prepare(c, rng) for c in check_crops(crops)])

    @torch.inference_mode()
    def score(self, crops: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        items = check_crops(crops)
        out = [torch.sigmoid(self.network(self.batch(items[i:i + batch_size])))
               for i in range(0, len(items), batch_size)]
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _write_weights(self, path: Path) -> None:
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        atomic_write(path, lambda fh: torch.save(state, fh))

    @classmethod
    def _from_saved(cls, manifest: dict[str, Any], weights: Path) -> CnnDetector:
        config = CnnConfig.from_dict(manifest["config"])
        network = PadCNN(config.widths, config.dropout)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            network.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{weights} does not fit the CNN its pad.json describes: "
                             f"{err}") from err
        return cls(network, config, float(manifest["threshold"]), PadInput(**manifest["input"]),
                   manifest.get("info", {}))


def _split_validation(subjects: np.ndarray, count: int, seed: int) -> list[str]:
    groups = sorted(set(subjects.tolist()))
    if count == 0:
        return []
    if count >= len(groups):
        raise ValueError(f"cannot hold out {count} validation subjects of {len(groups)}: "
                         "lower val_subjects or add subjects")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(groups, size=count, replace=False).tolist())


def train_cnn(
    crops: Sequence[np.ndarray],
    is_attack: Any,
    subjects: Sequence[str],
    config: CnnConfig | None = None,
    pad_input: PadInput | None = None,
    threshold_rule: str = "equal",
    target_apcer: float | None = None,
    log: Callable[[str], None] | None = None,
) -> CnnDetector:
    """Train the CNN (module docstring) and choose its threshold on held-out training
    subjects."""
    from facemetric.evaluation.pad import pad_errors, select_threshold

    config = config or CnnConfig()
    pad_input = pad_input or PadInput()
    started = time.perf_counter()
    items = check_crops(crops)
    y = np.asarray(is_attack).astype(bool)
    subj = np.asarray([str(s) for s in subjects])
    if not len(items) == y.shape[0] == subj.shape[0]:
        raise ValueError(f"{len(items)} crops, {y.shape[0]} labels and {subj.shape[0]} "
                         "subjects must match")
    val = _split_validation(subj, config.val_subjects, config.seed)
    held = np.isin(subj, val)
    train_idx = np.flatnonzero(~held)
    if y[train_idx].all() or not y[train_idx].any():
        raise ValueError("the CNN's training subjects must have both attack and bona fide "
                         "photos")
    torch.manual_seed(config.seed)
    network = PadCNN(config.widths, config.dropout)
    augment = augmentation(config)
    opt = torch.optim.AdamW(network.parameters(), lr=config.lr,
                            weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(train_idx.shape[0] / config.batch_size)
    total = config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    n_att = int(y[train_idx].sum())
    pos_weight = torch.tensor((train_idx.shape[0] - n_att) / n_att)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    rng = np.random.default_rng(config.seed)
    losses = []
    for epoch in range(config.epochs):
        network.train()
        order = rng.permutation(train_idx)
        total_loss = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            if idx.shape[0] < 2:  # batch norm needs two samples
                continue
            x = torch.stack([augment(items[i], rng) for i in idx])
            target = torch.from_numpy(y[idx].astype(np.float32))
            loss = loss_fn(network(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * idx.shape[0]
        losses.append(total_loss / train_idx.shape[0])
        if log is not None:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {losses[-1]:.4f}")
    network.eval()
    detector = CnnDetector(network, config, 0.5, pad_input)
    on = held if held.any() else ~held
    scores = detector.score([items[i] for i in np.flatnonzero(on)])
    if y[on].all() or not y[on].any():
        raise ValueError(f"the validation subjects {val} lack attack or bona fide photos: "
                         "choose another seed or val_subjects")
    threshold = select_threshold(scores, y[on], threshold_rule, target_apcer)
    where = (f"held-out training subjects {val}" if val else
             "the training scores themselves (optimistic: no subject was held out)")
    detector.threshold = threshold
    detector.info = {
        "training_subjects": sorted(set(subj[~held].tolist())),
        "validation_subjects": val,
        "attacks": int(y.sum()),
        "bona_fide": int((~y).sum()),
        "epoch_losses": losses,
        "threshold_rule": (f"{threshold_rule}" + (f" (APCER ≤ {target_apcer})"
                                                  if threshold_rule == "apcer" else "")
                           + f" on {where}"),
        "training_subject_errors": pad_errors(scores, y[on], threshold).to_dict(),
        "train_seconds": time.perf_counter() - started,
    }
    return detector


__all__ = ["CnnConfig", "CnnDetector", "PadCNN", "augmentation", "train_cnn"]
