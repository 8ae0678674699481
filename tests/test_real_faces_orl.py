"""Every loss learns on a real task: a small CNN trained on ORL faces recognises held-out images.

The split (``facemetric.demo.split_identities``, seed 0): 30 identities × 7 training images;
the other 3 images of each are held out; the remaining 10 identities are never trained on.
Faces are grayscale, downsampled to 28×23; 100 Adam steps on P×K = 8×4 batches.

ORL is easy: raw pixels already give ~0.95 1-NN accuracy and an *untrained* CNN 0.79–0.91,
so "above chance" alone (1/30) proves little. Each test therefore also demands that training
pulled identities apart: the separation d' = (mean same-identity cosine − mean
different-identity cosine) / pooled std, measured on the held-out images and on the unseen
identities, must grow well beyond the untrained network's.

Measured with ``train_and_measure(split_identities(images, labels, seed=s), factory, seed=s)``
for s = 0..3, all five losses: final/initial loss 0.07–0.33, held-out 1-NN 0.933–0.989, held-out d'
1.1–1.4 → 2.9–4.0 (gain ≥ 2.15), unseen d' 0.9–1.4 → 2.0–3.0 (gain ≥ 1.53). With the
labels shuffled every step (``test_the_measurements_can_fail``): loss ratio 0.71–0.85,
held-out d' gain ≤ 1.09. The thresholds below sit between the two with a margin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemetric.demo import (
    FaceSplit,
    SmallFaceCNN,
    embed,
    leave_one_out_accuracy,
    load_orl,
    nearest_neighbour_accuracy,
    split_identities,
    train_embedding,
    verification_accuracy,
)

pytestmark = [pytest.mark.data, pytest.mark.slow]

SIZE = (28, 23)
STEPS = 100
NUM_CLASSES = 30

MAX_LOSS_RATIO = 0.5  # final mean loss / initial mean loss
MIN_HELDOUT_NN = 0.85  # chance: 1/30
MIN_SEPARATION_GAIN = 1.5  # trained d' / untrained d', held-out images of training identities
MIN_UNSEEN_SEPARATION_GAIN = 1.3  # the same on the 10 identities never trained on


def _triplet_batch_hard(num_classes: int, dim: int) -> nn.Module:
    from facemetric.distances import CosineDistance
    from facemetric.losses.pair.triplet import TripletLoss
    from facemetric.miners.batch_hard import BatchHardMiner

    return TripletLoss(margin=0.2, miner=BatchHardMiner(distance=CosineDistance()))


def _contrastive(num_classes: int, dim: int) -> nn.Module:
    from facemetric.distances import CosineDistance
    from facemetric.losses.pair.contrastive import ContrastiveLoss

    return ContrastiveLoss(distance=CosineDistance(), pos_margin=0.0, neg_margin=0.5)


def _npair(num_classes: int, dim: int) -> nn.Module:
    from facemetric.losses.pair.npair import NPairLoss

    return NPairLoss()


def _arcface(num_classes: int, dim: int) -> nn.Module:
    from facemetric.losses.classifier.arcface import ArcFaceLoss

    return ArcFaceLoss(num_classes, dim, scale=16.0, margin=0.3)


def _cosface(num_classes: int, dim: int) -> nn.Module:
    from facemetric.losses.classifier.cosface import CosFaceLoss

    return CosFaceLoss(num_classes, dim, scale=16.0, margin=0.2)


PAIR_LOSSES: dict[str, Callable[[int, int], nn.Module]] = {
    "triplet-batch-hard": _triplet_batch_hard,
    "contrastive": _contrastive,
    "npair": _npair,
}
CLASSIFIER_LOSSES: dict[str, Callable[[int, int], nn.Module]] = {
    "arcface": _arcface,
    "cosface": _cosface,
}


@pytest.fixture(scope="module")
def orl_split(orl_root: Path) -> FaceSplit:
    images, labels, classes = load_orl(orl_root, size=SIZE)
    assert images.shape == (400, 1, *SIZE) and len(classes) == 40
    split = split_identities(images, labels, train_classes=NUM_CLASSES, seed=0)
    assert split.train_images.shape[0] == 210 and split.heldout_images.shape[0] == 90
    assert split.unseen_images.shape[0] == 100
    return split


# ------------------------------------------------------- independent reference measurements


def nn_accuracy_reference(
    gallery: Tensor, gallery_y: Tensor, probes: Tensor, probe_y: Tensor
) -> float:
    """1-NN by cosine, one probe at a time (deliberately not the demo's vectorised code)."""
    correct = 0
    for probe, label in zip(probes, probe_y.tolist(), strict=True):
        cos = F.cosine_similarity(gallery, probe[None], dim=1)
        correct += int(gallery_y[int(cos.argmax())]) == label
    return correct / probes.shape[0]


def separation(embeddings: Tensor, labels: Tensor) -> float:
    """d' between same-identity and different-identity cosine similarities (all pairs)."""
    e = F.normalize(embeddings, dim=1)
    same: list[float] = []
    diff: list[float] = []
    sim = (e @ e.T).tolist()
    y = labels.tolist()
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            (same if y[i] == y[j] else diff).append(sim[i][j])
    s, d = torch.tensor(same), torch.tensor(diff)
    return float((s.mean() - d.mean()) / torch.sqrt((s.var() + d.var()) / 2))


def train_and_measure(
    split: FaceSplit, factory: Callable[[int, int], nn.Module], seed: int = 0, steps: int = STEPS
) -> dict[str, float]:
    torch.manual_seed(seed)
    model = SmallFaceCNN()
    before_held = separation(embed(model, split.heldout_images), split.heldout_labels)
    before_unseen = separation(embed(model, split.unseen_images), split.unseen_labels)
    loss_fn = factory(NUM_CLASSES, model.embedding_size)
    history = train_embedding(
        model, loss_fn, split.train_images, split.train_labels, steps=steps, seed=seed
    )
    assert len(history) == steps and all(math.isfinite(v) for v in history)
    window = steps // 10
    gallery = embed(model, split.train_images)
    held = embed(model, split.heldout_images)
    unseen = embed(model, split.unseen_images)
    return {
        "first": sum(history[:window]) / window,
        "last": sum(history[-window:]) / window,
        "nn": nn_accuracy_reference(gallery, split.train_labels, held, split.heldout_labels),
        "sep_before": before_held,
        "sep_after": separation(held, split.heldout_labels),
        "unseen_before": before_unseen,
        "unseen_after": separation(unseen, split.unseen_labels),
    }


def _check(m: dict[str, float]) -> None:
    assert m["last"] < MAX_LOSS_RATIO * m["first"], m
    assert m["nn"] >= MIN_HELDOUT_NN, m
    assert m["sep_after"] >= MIN_SEPARATION_GAIN * m["sep_before"], m
    assert m["unseen_after"] >= MIN_UNSEEN_SEPARATION_GAIN * m["unseen_before"], m


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_pair_loss_learns_orl_faces(orl_split: FaceSplit, name: str) -> None:
    _check(train_and_measure(orl_split, PAIR_LOSSES[name]))


@pytest.mark.parametrize("name", list(CLASSIFIER_LOSSES))
def test_classifier_loss_learns_orl_faces(orl_split: FaceSplit, name: str) -> None:
    _check(train_and_measure(orl_split, CLASSIFIER_LOSSES[name]))


def test_the_measurements_can_fail(orl_split: FaceSplit) -> None:
    """A loss that ignores identity (labels shuffled every step) must not pass ``_check``."""

    class ShuffledLabels(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
            return self.inner(embeddings, labels[torch.randperm(labels.numel())])

    m = train_and_measure(orl_split, lambda c, d: ShuffledLabels(_triplet_batch_hard(c, d)))
    with pytest.raises(AssertionError):
        _check(m)


# ------------------------------------------------------------------ the demo's own measures


def test_demo_metrics_agree_with_references(orl_split: FaceSplit) -> None:
    torch.manual_seed(1)
    model = SmallFaceCNN()
    gallery, held = embed(model, orl_split.train_images), embed(model, orl_split.heldout_images)
    gy, hy = orl_split.train_labels, orl_split.heldout_labels
    fast = nearest_neighbour_accuracy(gallery, gy, held, hy)
    ref = nn_accuracy_reference(gallery, gy, held, hy)
    assert fast == pytest.approx(ref)

    # leave-one-out: the reference with each sample removed from its own gallery
    e, y = embed(model, orl_split.unseen_images), orl_split.unseen_labels
    hits = 0
    for i in range(e.shape[0]):
        rest = torch.cat([e[:i], e[i + 1 :]])
        rest_y = torch.cat([y[:i], y[i + 1 :]])
        hits += nn_accuracy_reference(rest, rest_y, e[i : i + 1], y[i : i + 1]) == 1.0
    assert leave_one_out_accuracy(e, y) == pytest.approx(hits / e.shape[0])


def test_verification_accuracy_extremes() -> None:
    labels = torch.arange(10).repeat_interleave(5)
    separable = F.one_hot(labels, 10).float() + 0.01 * torch.randn(50, 10)
    mean, std = verification_accuracy(separable, labels)
    assert mean == 1.0 and std == 0.0
    noise = torch.randn(50, 16)
    mean, _ = verification_accuracy(noise, labels)
    assert 0.3 < mean < 0.7  # no information: about a coin toss on held-out folds


def test_run_demo_end_to_end(orl_root: Path, tmp_path: Path) -> None:
    from facemetric.demo import run_demo

    result = run_demo(
        orl_root.parent, out_dir=tmp_path / "demo", steps=30, image_size=SIZE,
        losses=[("triplet", _triplet_batch_hard)], progress=False,
    )
    (run,) = result.runs
    assert run.loss == "triplet" and run.steps == 30 and len(run.losses) == 30
    assert run.initial_loss == pytest.approx(sum(run.losses[:1]))  # window: 1/20 of the steps
    assert all(math.isfinite(v) for v in run.losses)
    assert 0.0 <= run.heldout_nn_accuracy <= 1.0 and 0.0 <= run.verification_accuracy <= 1.0
    assert result.num_train_classes == 30 and result.num_heldout == 90
    assert result.num_unseen == 100
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"heldout_nn_accuracy"' in result.metrics_path.read_text()
    text = result.summary()
    assert "triplet" in text and str(result.plot_path) in text


def test_run_demo_without_data_says_where_to_get_it(tmp_path: Path) -> None:
    from facemetric.demo import run_demo

    with pytest.raises(FileNotFoundError) as info:
        run_demo(tmp_path, out_dir=tmp_path / "out", progress=False)
    message = str(info.value)
    assert str(tmp_path / "orl") in message and "s1..s40" in message
    assert "facedatabase" in message
    assert not (tmp_path / "out").exists()
