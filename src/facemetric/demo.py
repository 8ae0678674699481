"""The interim demo: train a small CNN on ORL faces with real losses, then measure it.

``run_demo(data_root)`` loads ``data_root/orl`` (AT&T / ORL: 40 people × 10 grayscale
images), keeps 30 identities for training (7 images each; 3 held out per identity) and 10
identities unseen, trains the same small CNN once per loss (ArcFace, then triplet with
batch-hard mining) on P×K batches, and reports for each:

- **closed-set 1-NN accuracy**: each held-out image of a training identity, labelled by its
  nearest training image (cosine); chance is 1/30;
- **unseen-identity 1-NN accuracy**: leave-one-out nearest neighbour among the 100 images of
  the 10 identities never trained on; chance is 9/99;
- **verification accuracy** on the unseen identities: all 450 same-identity pairs and 450
  different-identity pairs drawn at random, in 10 interleaved folds; the cosine threshold is
  chosen on 9 folds and applied to the 10th, so the threshold never sees the pairs it is
  scored on. Mean ± std over the folds.

It writes ``loss_curves.png`` and ``metrics.json`` to ``out_dir``. The CNN, the ORL loader and
split and the training loop are public so that the real-faces tests train exactly what the
demo shows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemetric.data.folders import IdentityFolder
from facemetric.evaluation.verification import kfold_accuracy

#: Where the ORL faces come from, for the message shown when they are missing.
ORL_SOURCE = (
    "the AT&T (ORL) Database of Faces, AT&T Laboratories Cambridge: 40 folders s1..s40 of "
    "ten 92x112 PGM images each (https://cam-orl.co.uk/facedatabase.html)"
)

#: ORL images are 92 wide × 112 high; the demo halves them.
DEFAULT_SIZE = (56, 46)


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


# ---------------------------------------------------------------------- data


@dataclass(frozen=True)
class FaceSplit:
    """ORL split into training images, held-out images of the training identities, and
    unseen identities. Images are ``(N, 1, H, W)`` float32 in ``[0, 1]``; labels ``int64``.
    Training and held-out labels are ``0 .. num_train_classes - 1``; unseen labels keep
    their own ids (they never meet a classifier)."""

    train_images: Tensor
    train_labels: Tensor
    heldout_images: Tensor
    heldout_labels: Tensor
    unseen_images: Tensor
    unseen_labels: Tensor

    @property
    def num_train_classes(self) -> int:
        return int(self.train_labels.max()) + 1


def load_orl(
    orl_root: str | Path, size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[Tensor, Tensor, list[str]]:
    """All ORL images as grayscale ``(N, 1, H, W)`` float32 in ``[0, 1]``, resized to
    ``size = (H, W)`` (area-averaged), with ``int64`` labels and the identity names.

    Raises:
        FileNotFoundError: ``orl_root`` holds no identity folders with images, with a note
            on where to get the data.
    """
    root = Path(orl_root)
    hint = f"expected ORL faces at {root}/s1..s40/*.pgm — get {ORL_SOURCE}"
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {root}: {hint}")
    folder = IdentityFolder(root, transform=_gray_tensor)
    if len(folder) == 0:
        raise FileNotFoundError(f"no images found under {root}: {hint}")
    folder.verify()
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    if images.shape[-2:] != size:
        images = F.interpolate(images, size=size, mode="area")
    return images.contiguous(), torch.as_tensor(folder.targets), list(folder.classes)


def _gray_tensor(image: np.ndarray) -> Tensor:
    gray = image.astype(np.float32).mean(axis=2) / 255.0
    return torch.from_numpy(gray)[None]


def split_identities(
    images: Tensor,
    labels: Tensor,
    train_classes: int = 30,
    train_per_class: int = 7,
    seed: int = 0,
) -> FaceSplit:
    """Pick ``train_classes`` identities at random (seeded) for training; of each, a random
    ``train_per_class`` images train and the rest are held out. The other identities are
    unseen. Training labels are renumbered ``0 .. train_classes - 1``."""
    classes = torch.unique(labels)
    if not 0 < train_classes <= classes.numel():
        raise ValueError(f"train_classes must be in 1..{classes.numel()}, got {train_classes}")
    gen = torch.Generator().manual_seed(seed)
    order = classes[torch.randperm(classes.numel(), generator=gen)]
    train_idx: list[Tensor] = []
    held_idx: list[Tensor] = []
    train_y: list[Tensor] = []
    held_y: list[Tensor] = []
    for new_label, c in enumerate(order[:train_classes].tolist()):
        idx = (labels == c).nonzero().squeeze(1)
        if idx.numel() <= train_per_class:
            raise ValueError(
                f"identity {c} has {idx.numel()} images; need more than train_per_class="
                f"{train_per_class} to hold some out"
            )
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        train_idx.append(idx[:train_per_class])
        held_idx.append(idx[train_per_class:])
        train_y.append(torch.full((train_per_class,), new_label, dtype=torch.int64))
        held_y.append(torch.full((idx.numel() - train_per_class,), new_label, dtype=torch.int64))
    unseen = torch.isin(labels, order[train_classes:]).nonzero().squeeze(1)
    tr, he = torch.cat(train_idx), torch.cat(held_idx)
    return FaceSplit(
        images[tr], torch.cat(train_y), images[he], torch.cat(held_y), images[unseen],
        labels[unseen].clone(),
    )


def pk_batches(
    labels: Tensor, p: int, k: int, steps: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """``steps`` batches of indices: ``p`` random identities × ``k`` random images of each
    (without replacement within a batch; every identity needs at least ``k`` images)."""
    classes = torch.unique(labels)
    if p > classes.numel():
        raise ValueError(f"p={p} identities per batch, but only {classes.numel()} exist")
    members = [(labels == c).nonzero().squeeze(1) for c in classes.tolist()]
    if min(m.numel() for m in members) < k:
        raise ValueError(f"k={k} images per identity, but some identity has fewer")
    for _ in range(steps):
        chosen = torch.randperm(classes.numel(), generator=generator)[:p].tolist()
        yield torch.cat(
            [members[c][torch.randperm(members[c].numel(), generator=generator)[:k]]
             for c in chosen]
        )


def train_embedding(
    model: nn.Module,
    loss_fn: nn.Module,
    images: Tensor,
    labels: Tensor,
    steps: int = 300,
    p: int = 8,
    k: int = 4,
    lr: float = 3e-3,
    seed: int = 0,
    flip: bool = True,
    progress: str | None = None,
) -> list[float]:
    """Train ``model`` (and ``loss_fn``'s own parameters, e.g. class centres) for ``steps``
    Adam steps on P×K batches; return the loss of every step.

    ``loss_fn(embeddings, labels)`` gets the raw model output. The learning rate follows a
    cosine decay to 0 over ``steps``; ``flip`` mirrors each image with probability ½.
    ``progress`` is a tqdm bar description (``None``: no bar).
    """
    gen = torch.Generator().manual_seed(seed)
    params = [*model.parameters(), *loss_fn.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps))
    )
    batches: Iterator[Tensor] = pk_batches(labels, p, k, steps, gen)
    bar = None
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=progress, unit="step", dynamic_ncols=True)
    model.train()
    loss_fn.train()
    history: list[float] = []
    for idx in batches:
        x = images[idx]
        if flip:
            mirror = torch.rand(x.shape[0], generator=gen) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        loss = loss_fn(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return history


@torch.no_grad()
def embed(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """L2-normalised embeddings of ``images`` with ``model`` in eval mode."""
    model.eval()
    out = [model(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return F.normalize(torch.cat(out), dim=1)


# ---------------------------------------------------------------------- evaluation


def nearest_neighbour_accuracy(
    gallery: Tensor, gallery_labels: Tensor, probes: Tensor, probe_labels: Tensor
) -> float:
    """Fraction of probes whose most cosine-similar gallery embedding has their label."""
    sim = F.normalize(probes, dim=1) @ F.normalize(gallery, dim=1).T
    return float((gallery_labels[sim.argmax(dim=1)] == probe_labels).float().mean())


def leave_one_out_accuracy(embeddings: Tensor, labels: Tensor) -> float:
    """1-NN accuracy of each embedding against all the others (cosine)."""
    e = F.normalize(embeddings, dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return float((labels[sim.argmax(dim=1)] == labels).float().mean())


def verification_accuracy(
    embeddings: Tensor, labels: Tensor, folds: int = 10, seed: int = 0
) -> tuple[float, float]:
    """Mean and std over ``folds`` of pair-verification accuracy, threshold chosen on the
    other folds.

    Pairs: every same-label pair, plus as many different-label pairs drawn at random
    (seeded). Pair ``i`` goes to fold ``i mod folds`` after a shuffle; the k-fold protocol
    is :func:`facemetric.evaluation.kfold_accuracy` (std with ddof=1).
    """
    e = F.normalize(embeddings, dim=1)
    n = e.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    same = labels[iu[0]] == labels[iu[1]]
    gen = torch.Generator().manual_seed(seed)
    pos = same.nonzero().squeeze(1)
    neg = (~same).nonzero().squeeze(1)
    if pos.numel() < folds or neg.numel() < pos.numel():
        raise ValueError("too few same-identity pairs for a verification split")
    neg = neg[torch.randperm(neg.numel(), generator=gen)[: pos.numel()]]
    pairs = torch.cat([pos, neg])
    pairs = pairs[torch.randperm(pairs.numel(), generator=gen)]
    scores = (e[iu[0, pairs]] * e[iu[1, pairs]]).sum(1).numpy()
    result = kfold_accuracy(scores, same[pairs].numpy(), folds=folds)
    return result.accuracy, result.accuracy_std


@dataclass
class DemoRun:
    """One loss trained and measured."""

    loss: str
    steps: int
    seconds: float
    initial_loss: float
    final_loss: float
    heldout_nn_accuracy: float
    unseen_nn_accuracy: float
    verification_accuracy: float
    verification_std: float
    losses: list[float] = field(repr=False)


@dataclass
class DemoResult:
    """What ``run_demo`` measured and wrote."""

    runs: list[DemoRun]
    plot_path: Path
    metrics_path: Path
    num_train_classes: int
    num_heldout: int
    num_unseen: int

    def summary(self) -> str:
        """A small text table of the runs and where the plot was written."""
        lines = [
            f"ORL: {self.num_train_classes} training identities, {self.num_heldout} held-out "
            f"images of them, {self.num_unseen} images of unseen identities",
            f"{'loss':<22}{'steps':>6}{'time':>8}{'loss first→last':>18}"
            f"{'1-NN held-out':>15}{'1-NN unseen':>13}{'verif. unseen':>17}",
        ]
        for r in self.runs:
            lines.append(
                f"{r.loss:<22}{r.steps:>6}{r.seconds:>7.1f}s"
                f"{f'{r.initial_loss:.3f}→{r.final_loss:.3f}':>18}"
                f"{r.heldout_nn_accuracy:>15.3f}{r.unseen_nn_accuracy:>13.3f}"
                f"{f'{r.verification_accuracy:.3f}±{r.verification_std:.3f}':>17}"
            )
        lines.append(
            f"chance: 1-NN held-out {1 / self.num_train_classes:.3f}, verification 0.500"
        )
        lines.append(f"loss curves: {self.plot_path}; metrics: {self.metrics_path}")
        return "\n".join(lines)


LossFactory = Callable[[int, int], nn.Module]


def default_losses() -> list[tuple[str, LossFactory]]:
    """The demo's losses: ``(name, factory(num_classes, embedding_size) -> loss module)``."""
    from facemetric.distances import CosineDistance
    from facemetric.losses.classifier.arcface import ArcFaceLoss
    from facemetric.losses.pair.triplet import TripletLoss
    from facemetric.miners.batch_hard import BatchHardMiner

    def arcface(num_classes: int, embedding_size: int) -> nn.Module:
        return ArcFaceLoss(num_classes, embedding_size, scale=16.0, margin=0.3)

    def triplet(num_classes: int, embedding_size: int) -> nn.Module:
        return TripletLoss(margin=0.2, miner=BatchHardMiner(distance=CosineDistance()))

    return [("ArcFace", arcface), ("triplet + batch-hard", triplet)]


def run_demo(
    data_root: Path,
    out_dir: Path = Path("runs/demo"),
    steps: int = 400,
    losses: Sequence[tuple[str, LossFactory]] | None = None,
    seed: int = 0,
    progress: bool = True,
    image_size: tuple[int, int] = DEFAULT_SIZE,
) -> DemoResult:
    """Train the small CNN on ORL (``data_root/orl``) once per loss and measure it.

    Args:
        data_root: the data folder holding ``orl/``.
        out_dir: where ``loss_curves.png`` and ``metrics.json`` go (created).
        steps: training steps per loss (P×K = 8×4 batches).
        losses: ``(name, factory)`` pairs; default ``default_losses()`` (ArcFace, triplet).
        seed: fixes the split, the initialisation and the batches.
        progress: show a tqdm bar per loss.
        image_size: ``(H, W)`` the faces are resized to.

    At the defaults training takes about 30 s per loss on one CPU core (~75 ms a step).

    Raises:
        FileNotFoundError: ``data_root/orl`` is missing or empty (the message says where to
            get ORL and which layout is expected).
    """
    data_root = Path(data_root)
    orl = data_root / "orl"
    if not orl.is_dir():
        raise FileNotFoundError(
            f"the demo needs ORL faces at {orl} (folders s1..s40 of PGM images), not found. "
            f"Get {ORL_SOURCE}, unpack it as {orl}, and pass the folder holding it "
            "(make demo uses FACEMETRIC_DATA, default ../shared/data)."
        )
    images, labels, _ = load_orl(orl, size=image_size)
    split = split_identities(images, labels, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[DemoRun] = []
    for name, factory in default_losses() if losses is None else losses:
        torch.manual_seed(seed)
        model = SmallFaceCNN()
        loss_fn = factory(split.num_train_classes, model.embedding_size)
        start = time.perf_counter()
        history = train_embedding(
            model, loss_fn, split.train_images, split.train_labels, steps=steps, seed=seed,
            progress=name if progress else None,
        )
        seconds = time.perf_counter() - start
        runs.append(_measure(name, model, split, history, seconds, seed))
    plot_path = _plot(runs, out_dir / "loss_curves.png")
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(
        json.dumps([{k: v for k, v in asdict(r).items() if k != "losses"} for r in runs], indent=2)
        + "\n"
    )
    return DemoResult(
        runs, plot_path, metrics_path, split.num_train_classes,
        int(split.heldout_labels.numel()), int(split.unseen_labels.numel()),
    )


def _measure(
    name: str, model: nn.Module, split: FaceSplit, history: list[float], seconds: float,
    seed: int,
) -> DemoRun:
    train_e = embed(model, split.train_images)
    held_e = embed(model, split.heldout_images)
    unseen_e = embed(model, split.unseen_images)
    ver, ver_std = verification_accuracy(unseen_e, split.unseen_labels, seed=seed)
    window = max(1, len(history) // 20)
    return DemoRun(
        loss=name,
        steps=len(history),
        seconds=seconds,
        initial_loss=float(np.mean(history[:window])),
        final_loss=float(np.mean(history[-window:])),
        heldout_nn_accuracy=nearest_neighbour_accuracy(
            train_e, split.train_labels, held_e, split.heldout_labels
        ),
        unseen_nn_accuracy=leave_one_out_accuracy(unseen_e, split.unseen_labels),
        verification_accuracy=ver,
        verification_std=ver_std,
        losses=history,
    )


def _plot(runs: Sequence[DemoRun], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        steps = np.arange(1, len(run.losses) + 1)
        ax.plot(steps, run.losses, lw=0.6, alpha=0.4, label="per step")
        window = max(1, len(run.losses) // 30)
        smooth = np.convolve(run.losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"mean of {window}")
        ax.set_title(f"{run.loss}: 1-NN {run.heldout_nn_accuracy:.2f}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.suptitle("facemetric demo: ORL, small CNN")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "DemoResult",
    "DemoRun",
    "FaceSplit",
    "SmallFaceCNN",
    "embed",
    "leave_one_out_accuracy",
    "load_orl",
    "nearest_neighbour_accuracy",
    "pk_batches",
    "run_demo",
    "split_identities",
    "train_embedding",
    "verification_accuracy",
]
