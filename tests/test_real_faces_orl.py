"""Real faces through the real pipeline: the ORL example trains with ``train()`` and is measured
on identities it never saw.

Every learning test here goes through :func:`facemetric.experiments.orl.run_orl_example` (or,
for the shuffled-label control, the same :func:`~facemetric.experiments.orl.orl_config` and
:func:`facemetric.training.train`): ``IdentityFolder`` over ORL with a people file of 30
identities, ``PKSampler`` batches of 8 × 4 for pair losses and shuffled batches of 32 for
classifier losses, the registered ``small_cnn`` at 48×48 RGB, 150 AdamW steps, seed 0. The
trained run and its step-0 weights are loaded back with ``load_model`` and measured on the 100
images of the 10 unseen identities: leave-one-out 1-NN accuracy and 10-fold verification
accuracy over all 4,950 pairs (450 same, 4,500 different: rejecting every pair scores 0.909).

Measurements behind the floors: ``run_orl_example(data, out, steps=150, loss=L, seed=s,
image_size=48)`` for s = 0..5 under ``torch.set_num_threads(1)`` (the seed changes the
identity split, the initialisation and the batches); the shuffled-label controls are
:func:`train_with_shuffled_labels` with the same settings. Ranges over the six seeds:

=========================  ===============  ===============  ===========  ===============
run                        verification     EER              1-NN (LOO)   loss last/first
=========================  ===============  ===============  ===========  ===============
arcface                    0.961 – 0.980    0.060 – 0.179    0.99 – 1.00  0.003 – 0.007
cosface                    0.960 – 0.979    0.049 – 0.162    0.98 – 1.00  0.004 – 0.010
triplet + batch-hard       0.958 – 0.982    0.044 – 0.129    0.97 – 1.00  0.013 – 0.065
multi-similarity           0.959 – 0.988    0.031 – 0.133    0.98 – 1.00  0.015 – 0.069
softmax                    0.938 – 0.956    0.062 – 0.185    0.96 – 0.99  0.057 – 0.110
contrastive (not tested)   0.948 – 0.970    0.069 – 0.162    0.98 – 1.00  0.152 – 0.208
untrained (step 0)         0.934 – 0.953    0.153 – 0.234    0.96 – 1.00  —
shuffled labels, triplet   0.942 – 0.954    0.131 – 0.229    0.98 – 1.00  0.785 – 0.878
shuffled labels, arcface   0.938 – 0.954    0.093 – 0.240    0.91 – 1.00  0.747 – 0.801
=========================  ===============  ===============  ===========  ===============

At seed 0 (what the tests run): arcface 0.968 (untrained 0.942), cosface 0.969, triplet 0.958,
multi-similarity 0.959, softmax 0.955; shuffled-label triplet 0.9515 with loss ratio 0.84.

What this says about ORL: it is easy. An *untrained* network already finds nearly every
unseen face's identity by 1-NN (0.96–1.00), so 1-NN is only a sanity floor here; what
training buys is verification accuracy and EER. Training on shuffled labels improves the
features a little too (it still learns ORL's image statistics) but cannot fit its loss.
So each run must pass:

- **loss ratio** (mean loss of the last tenth of the steps / of the first tenth) ≤ 0.4:
  every trained run ≤ 0.21, every shuffled-label run ≥ 0.74;
- **verification accuracy** ≥ 0.956 for the margin and pair losses: above every control
  (≤ 0.954) and below every trained run (≥ 0.958) — a narrow gap (about a dozen of the 4,950
  pairs), which is the honest size of the effect on ORL at this budget; and the trained
  network must beat its own step 0 (verification for pair losses, EER for classifiers, by
  ≥ 0.01 verification in the end-to-end test: the smallest gain measured was 0.014);
- sanity floors for all: 1-NN ≥ 0.95 and EER ≤ 0.20.

Plain softmax fits the 30 training identities (loss ratio ≤ 0.11) but its un-normalised
features barely transfer to unseen faces under cosine scoring (verification inside the
untrained range; EER better than step 0 at every seed, by 0.007–0.130), so its
verification floor is 0.935, "no worse than untrained", plus the loss ratio and EER gain.
(A learning rate of 1e-3 did not change that: 0.941–0.960 over four seeds.)

Controls (``test_the_floors_fail_without_learning``): the untrained scores of the same run
fail the verification floor (zero steps), and the shuffled-label run fails the loss ratio
and, on its own, the verification floor.

Wall time of this file: 64–75 s on the shared 2-core machine at load averages of 4–7 (42 s
of CPU), six training runs of about 8 s each when the machine is quiet.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from facemetric.data.folders import IdentityFolder, read_people_file
from facemetric.experiments.orl import (
    ORL_IDENTITIES,
    OrlResult,
    OrlScores,
    embed_and_measure,
    find_orl,
    measure_unseen,
    orl_config,
    run_orl_example,
    split_identities,
    write_people_file,
)
from facemetric.inference import load_model
from facemetric.models import SmallFaceCNN
from facemetric.training import config_from_dict, train
from facemetric.training.loop import keep_array

STEPS = 150
SIZE = 48
SEED = 0

MAX_LOSS_RATIO = 0.4
MIN_VERIFICATION = 0.956  # margin and pair losses; rejecting every pair scores 0.909
MIN_VERIFICATION_SOFTMAX = 0.935  # no worse than the untrained range
MIN_NN = 0.95  # sanity: the untrained network is already there
MAX_EER = 0.20  # sanity

PAIR_LOSSES = ["triplet", "multi_similarity"]
MARGIN_LOSSES = ["arcface", "cosface"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the runs are bitwise reproducible, and on a shared 2-core machine
    two threads fighting other processes made a training step 10× slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def orl_run(orl_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """``orl_run(loss)``: the example trained once per loss for the whole module."""
    runs: dict[str, OrlResult] = {}

    def get(loss: str) -> OrlResult:
        if loss not in runs:
            out = tmp_path_factory.mktemp(f"orl-{loss}")
            runs[loss] = run_orl_example(orl_root.parent, out, steps=STEPS, loss=loss,
                                         progress=False, seed=SEED, image_size=SIZE)
        return runs[loss]

    return get


def loss_ratio(losses: list[float]) -> float:
    window = len(losses) // 10
    return float(np.mean(losses[-window:]) / np.mean(losses[:window]))


def check_floors(scores: OrlScores, ratio: float, min_verification: float) -> None:
    assert ratio <= MAX_LOSS_RATIO, f"loss ratio {ratio:.3f} > {MAX_LOSS_RATIO}"
    assert scores.nn_accuracy >= MIN_NN, f"1-NN {scores.nn_accuracy:.3f} < {MIN_NN}"
    assert scores.eer <= MAX_EER, f"EER {scores.eer:.4f} > {MAX_EER}"
    assert scores.verification_accuracy >= min_verification, (
        f"verification {scores.verification_accuracy:.4f} < {min_verification}"
    )


# ------------------------------------------------------------------ independent references


def load_faces(paths: list[Path]) -> np.ndarray:
    """The files as ``(n, H, W, 3)`` uint8, decoded with PIL here (not the library's loader)."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def nn_accuracy_reference(e: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out 1-NN by cosine, one query at a time."""
    hits = 0
    for i in range(len(y)):
        best, best_sim = -1, -math.inf
        for j in range(len(y)):
            if j != i:
                sim = float(e[i] @ e[j]) / float(np.linalg.norm(e[i]) * np.linalg.norm(e[j]))
                if sim > best_sim:
                    best, best_sim = j, sim
        hits += int(y[best] == y[i])
    return hits / len(y)


def verification_reference(e: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """All pairs ``i < j`` in row-major order, pair ``n`` in fold ``n mod k``; per fold, every
    midpoint between distinct training scores (and ±inf) is tried, the smallest of the best
    is applied to the held-out fold; the mean held-out accuracy."""
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    scores, same = [], []
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            scores.append(float(u[i] @ u[j]))
            same.append(bool(y[i] == y[j]))
    s, t = np.array(scores), np.array(same)
    fold = np.arange(len(s)) % k
    accs = []
    for f in range(k):
        s_tr, t_tr = s[fold != f], t[fold != f]
        levels = np.unique(s_tr)
        candidates = np.r_[-np.inf, (levels[:-1] + levels[1:]) / 2, np.inf]
        train_acc = ((s_tr[None, :] >= candidates[:, None]) == t_tr[None, :]).mean(axis=1)
        tau = candidates[int(np.argmax(train_acc))]
        accs.append(float(((s[fold == f] >= tau) == t[fold == f]).mean()))
    return float(np.mean(accs))


class ShuffledLabels(Dataset):
    """An ``IdentityFolder``'s images with its labels permuted once (seeded): every identity
    keeps its number of images, so P×K batches still work, but a label says nothing about
    whose face it is."""

    def __init__(self, base: IdentityFolder, seed: int) -> None:
        self.base = base
        self.targets = np.random.default_rng(seed).permutation(base.targets)
        self.num_classes = base.num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.base[index][0], int(self.targets[index])


def train_with_shuffled_labels(
    orl_root: Path, out: Path, loss: str = "triplet", seed: int = SEED
) -> tuple[OrlScores, float]:
    """The example's configuration and ``train()``, on shuffled labels; measured like the
    example. Returns the unseen scores and the loss ratio."""
    orl = find_orl(orl_root.parent)
    train_ids, unseen_ids = split_identities(seed)
    people = write_people_file(out / "train_people.txt", orl, train_ids)
    unseen_file = write_people_file(out / "unseen_people.txt", orl, unseen_ids)
    raw = orl_config(orl, people, out / "train", loss=loss, steps=STEPS, seed=seed,
                     image_size=SIZE)
    config = config_from_dict(raw)
    dataset = ShuffledLabels(IdentityFolder(orl, people_file=people, transform=keep_array), seed)
    result = train(config, dataset=dataset, progress=False)
    unseen = IdentityFolder(orl, people_file=unseen_file)
    scores = embed_and_measure(out / "train", [p for p, _ in unseen.samples],
                               [y for _, y in unseen.samples])
    return scores, loss_ratio(result.losses)


# ------------------------------------------------------------------ learning on real faces


@pytest.mark.parametrize("loss", PAIR_LOSSES)
@pytest.mark.data
@pytest.mark.slow
def test_pair_loss_learns_faces_it_never_saw(orl_run, loss: str) -> None:
    result = orl_run(loss)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["batch"]["p"] == 8 and config["batch"]["k"] == 4  # PKSampler batches
    if loss == "triplet":
        assert config["loss"]["miner"] == "batch_hard"
    check_floors(result.trained, loss_ratio(result.losses), MIN_VERIFICATION)
    assert result.trained.verification_accuracy > result.untrained.verification_accuracy


@pytest.mark.parametrize("loss", [*MARGIN_LOSSES, "softmax"])
@pytest.mark.data
@pytest.mark.slow
def test_classifier_loss_learns_faces_it_never_saw(orl_run, loss: str) -> None:
    result = orl_run(loss)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["batch"]["p"] is None and config["batch"]["size"] == 32  # plain batches
    floor = MIN_VERIFICATION if loss in MARGIN_LOSSES else MIN_VERIFICATION_SOFTMAX
    check_floors(result.trained, loss_ratio(result.losses), floor)
    assert result.trained.eer < result.untrained.eer


@pytest.mark.data
@pytest.mark.slow
def test_the_floors_fail_without_learning(orl_run, orl_root: Path, tmp_path: Path) -> None:
    # zero steps: the untrained network of the same run
    untrained = orl_run("arcface").untrained
    assert untrained.step == 0
    with pytest.raises(AssertionError, match="verification"):
        check_floors(untrained, 0.0, MIN_VERIFICATION)  # even granting it a perfect loss ratio
    # the same training on labels that say nothing about the face
    shuffled, ratio = train_with_shuffled_labels(orl_root, tmp_path)
    with pytest.raises(AssertionError, match="loss ratio"):
        check_floors(shuffled, ratio, MIN_VERIFICATION)
    assert ratio > 2 * MAX_LOSS_RATIO
    with pytest.raises(AssertionError, match="verification"):
        check_floors(shuffled, 0.0, MIN_VERIFICATION)


# ------------------------------------------------------------------ the example end to end


@pytest.mark.data
@pytest.mark.slow
def test_run_orl_example_end_to_end(orl_run, orl_root: Path) -> None:
    result = orl_run("arcface")
    # what trained: 30 identities by people file, all steps, the run's own files
    assert result.steps == STEPS and len(result.losses) == STEPS
    assert all(math.isfinite(v) for v in result.losses)
    assert len(result.train_identities) == 30 and len(result.unseen_identities) == 10
    assert set(result.train_identities) | set(result.unseen_identities) == set(ORL_IDENTITIES)
    assert not set(result.train_identities) & set(result.unseen_identities)
    assert read_people_file(result.people_file) == [[(n, 10) for n in result.train_identities]]
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["data"]["people_file"] == str(result.people_file)
    assert config["model"]["name"] == "small_cnn" and config["data"]["image_size"] == SIZE
    rows = list(csv.DictReader((result.run_dir / "log.csv").open()))
    assert int(rows[-1]["step"]) == STEPS
    assert result.loss_curve == result.run_dir / "loss_curve.png"
    assert result.loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # metrics.json holds what the result says
    saved = json.loads(result.metrics_path.read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))
    assert saved["trained"]["verification_accuracy"] == result.trained.verification_accuracy
    assert saved["reject_all_accuracy"] == pytest.approx(4500 / 4950)

    # step 0 is the network training started from: torch.manual_seed(seed), then the model
    torch.manual_seed(SEED)
    fresh = SmallFaceCNN(64, in_channels=3, width=16).state_dict()
    untrained = load_model(result.untrained_dir)
    trained = load_model(result.run_dir)
    assert untrained.contract.extra["step"] == 0 and trained.contract.extra["step"] == STEPS
    for name, value in fresh.items():
        assert torch.equal(untrained.model.state_dict()[name], value), name
    assert not torch.equal(trained.model.state_dict()["embed.weight"], fresh["embed.weight"])

    # the numbers, recomputed independently from the unseen files, in the documented order
    # (identities sorted by name, so s10 before s2; files 1..10): it decides the folds
    paths = [orl_root / n / f"{i}.pgm" for n in sorted(result.unseen_identities)
             for i in range(1, 11)]
    labels = np.array([int(p.parent.name[1:]) for p in paths])
    faces = load_faces(paths)
    for encoder, scores in ((untrained, result.untrained), (trained, result.trained)):
        e = encoder.embed_faces(faces).astype(np.float64)
        assert scores.nn_accuracy == pytest.approx(nn_accuracy_reference(e, labels))
        assert scores.verification_accuracy == pytest.approx(verification_reference(e, labels))
        assert (scores.num_images, scores.same_pairs, scores.different_pairs) == (100, 450, 4500)

    # the gain is visible and real
    check_floors(result.trained, loss_ratio(result.losses), MIN_VERIFICATION)
    assert result.trained.verification_accuracy >= result.untrained.verification_accuracy + 0.01
    text = result.summary()
    assert "untrained" in text and "arcface" in text and str(result.metrics_path) in text
    assert f"{result.trained.verification_accuracy:.3f}" in text


@pytest.mark.data
@pytest.mark.slow
def test_run_orl_example_reuses_its_finished_run(orl_run, orl_root: Path) -> None:
    first = orl_run("triplet")
    checkpoint = next(first.run_dir.glob("checkpoint_*.pt"))
    stamp = checkpoint.stat().st_mtime_ns
    out = first.run_dir.parent
    again = run_orl_example(orl_root.parent, out, steps=STEPS, loss="triplet", progress=False,
                            seed=SEED, image_size=SIZE)
    assert again.trained == first.trained and again.untrained == first.untrained
    assert again.losses == first.losses and again.train_seconds == 0.0
    assert checkpoint.stat().st_mtime_ns == stamp  # not trained again
    differ = r"batch\.k, batch\.p, batch\.size, loss\.distance, loss\.miner differ"
    with pytest.raises(FileExistsError, match=rf"other settings \({differ}\)"):
        run_orl_example(orl_root.parent, out, steps=STEPS, loss="arcface", progress=False,
                        seed=SEED, image_size=SIZE)


# ------------------------------------------------------------------ without data


def test_missing_orl_says_where_to_get_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as info:
        run_orl_example(tmp_path, out, progress=False)
    message = str(info.value)
    assert str(tmp_path / "orl") in message and "s1..s40" in message
    assert "cam-orl.co.uk/facedatabase.html" in message and "AT&T" in message
    assert not out.exists()

    (tmp_path / "orl" / "s1").mkdir(parents=True)
    (tmp_path / "orl" / "s1" / "1.pgm").write_bytes(b"P5 1 1 255\n\x00")
    with pytest.raises(FileNotFoundError, match=r"39 missing or empty, e\.g\. \['s2'"):
        run_orl_example(tmp_path, out, progress=False)
    assert not out.exists()


def test_measure_unseen_against_hand_computed_cases() -> None:
    labels = np.repeat(np.arange(4), 3)
    separable = np.eye(4)[labels] + 0.01 * np.random.default_rng(0).normal(size=(12, 4))
    scores = measure_unseen(separable, labels, step=7)
    assert scores.step == 7 and scores.nn_accuracy == 1.0
    assert scores.verification_accuracy == 1.0 and scores.eer == 0.0
    assert (scores.same_pairs, scores.different_pairs) == (12, 54)

    # 1-NN by hand: the only near neighbour of row 0 has another label
    e = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.1, 0.99]])
    y = np.array([0, 1, 0, 1])
    assert measure_unseen(e, y, step=0, folds=2).nn_accuracy == 0.0

    # a file that failed to embed is a NaN row: left out and counted
    broken = separable.copy()
    broken[0] = np.nan
    scores = measure_unseen(broken, labels, step=0)
    assert scores.failed_images == 1 and scores.num_images == 11
    assert (scores.same_pairs, scores.different_pairs) == (10, 45)
    with pytest.raises(ValueError, match="two embedded images"):
        measure_unseen(np.eye(3), [0, 1, 1], step=0)


def test_orl_config_batches_and_unknown_losses(tmp_path: Path) -> None:
    pair = config_from_dict(orl_config(tmp_path, tmp_path / "p.txt", tmp_path / "r",
                                       loss="triplet", steps=5))
    assert (pair.batch.p, pair.batch.k, pair.loss.miner) == (8, 4, "batch_hard")
    classifier = config_from_dict(orl_config(tmp_path, tmp_path / "p.txt", tmp_path / "r",
                                             loss="cosface", steps=5))
    assert classifier.batch.p is None and classifier.batch.size == 32
    assert classifier.train.max_steps == 5 and classifier.model.name == "small_cnn"
    with pytest.raises(ValueError, match="unknown loss 'no_such_loss'"):
        orl_config(tmp_path, tmp_path / "p.txt", tmp_path / "r", loss="no_such_loss")
    a, b = split_identities(3), split_identities(3)
    assert a == b and len(a[0]) == 30 and split_identities(4) != a
