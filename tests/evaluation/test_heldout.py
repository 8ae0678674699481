"""Held-out validation pairs from a training split, and choosing a checkpoint on them.

The pairs file is checked against a listing of the folder (identity sizes, names, folds read
back from the text), and the selection against scikit-learn's AUC and a float64 k-fold
accuracy computed here from each checkpoint's embeddings.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from facemetric.evaluation import plots
from facemetric.evaluation.heldout import (
    CheckpointScore,
    Selection,
    heldout_pairs,
    plot_selection,
    select_checkpoint,
    trained_identities,
)
from facemetric.evaluation.protocols import read_lfw_pairs
from facemetric.inference.load import load_model
from facemetric.training import config_from_dict, train

SIDE = 32
#: identities with 1..6 images; ``below = 4`` holds out those with 1-3
SIZES = {f"p{i:02d}": 1 + (i % 6) for i in range(60)}


@pytest.fixture(scope="module")
def lfw_like(tmp_path_factory) -> tuple[Path, Path]:
    """An LFW-layout tree (``Name/Name_0001.png``) and its people file."""
    root = tmp_path_factory.mktemp("lfwlike")
    rng = np.random.default_rng(0)
    for name, n in SIZES.items():
        (root / name).mkdir()
        base = rng.integers(0, 256, (4, 4, 3))
        for j in range(1, n + 1):
            img = np.kron(base, np.ones((SIDE // 4, SIDE // 4, 1))) + rng.normal(
                0, 20, (SIDE, SIDE, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / name / f"{name}_{j:04d}.png")
    people = root.parent / "people.txt"
    people.write_text(f"{len(SIZES)}\n" + "".join(f"{n}\t{c}\n" for n, c in SIZES.items()))
    return root, people


def _on_disk(root: Path) -> dict[str, int]:
    return {d.name: len(list(d.iterdir())) for d in root.iterdir() if d.is_dir()}


def _parse(path: Path) -> tuple[int, int, list[list[str]]]:
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    folds, per_fold = (int(x) for x in lines[0])
    return folds, per_fold, lines[1:]


def test_heldout_pairs_use_only_identities_below_the_threshold_in_disjoint_folds(
        lfw_like, tmp_path):
    root, people = lfw_like
    out = tmp_path / "val.txt"
    written = heldout_pairs(root, people, out, below=4, folds=5, seed=3)
    sizes = _on_disk(root)
    folds, per_fold, body = _parse(out)
    assert (folds, per_fold) == (written.folds, written.per_fold) == (5, written.per_fold)
    assert len(body) == 2 * folds * per_fold
    assert written.identities == sum(1 for n in sizes.values() if n < 4)
    assert written.with_matches == sum(1 for n in sizes.values() if 2 <= n < 4)
    fold_names: list[set[str]] = []
    for k in range(folds):
        block = body[2 * per_fold * k: 2 * per_fold * (k + 1)]
        matched, mismatched = block[:per_fold], block[per_fold:]
        names: set[str] = set()
        for name, a, b in matched:
            assert sizes[name] < 4 and 1 <= int(a) < int(b) <= sizes[name]
            names.add(name)
        assert len({tuple(m) for m in matched}) == per_fold
        for n1, a, n2, b in mismatched:
            assert n1 != n2 and sizes[n1] < 4 and sizes[n2] < 4
            assert 1 <= int(a) <= sizes[n1] and 1 <= int(b) <= sizes[n2]
            names |= {n1, n2}
        assert len({tuple(m) for m in mismatched}) == per_fold
        fold_names.append(names)
    for a, b in pairwise(fold_names):
        assert not a & b
    assert not set().union(*fold_names) & {n for n, c in sizes.items() if c >= 4}
    # the default per_fold is what the poorest fold allows: one more is refused
    with pytest.raises(ValueError, match="lower per_fold"):
        heldout_pairs(root, people, tmp_path / "x.txt", below=4, folds=5, seed=3,
                      per_fold=per_fold + 1)
    # the protocol reader takes it as View 2 (contiguous folds); .jpg names resolve later
    pairs = read_lfw_pairs(out, root)
    assert len(pairs) == 2 * folds * per_fold
    assert np.bincount(pairs.fold).tolist() == [2 * per_fold] * folds


def test_heldout_pairs_refusals(lfw_like, tmp_path):
    root, people = lfw_like
    with pytest.raises(ValueError, match="below must be >= 3"):
        heldout_pairs(root, people, tmp_path / "v.txt", below=2)
    with pytest.raises(ValueError, match="too few for 40 folds"):
        heldout_pairs(root, people, tmp_path / "v.txt", below=4, folds=40)
    odd = tmp_path / "odd"
    (odd / "ann").mkdir(parents=True)
    for j in range(2):
        Image.new("RGB", (8, 8)).save(odd / "ann" / f"img{j}.png")
    (tmp_path / "odd_people.txt").write_text("1\nann\t2\n")
    with pytest.raises(ValueError, match="LFW"):
        heldout_pairs(odd, tmp_path / "odd_people.txt", tmp_path / "v.txt", below=4, folds=2)


def _run(root: Path, people: Path, out: Path) -> Path:
    torch.set_num_threads(1)
    raw = {
        "seed": 0,
        "output_dir": str(out),
        "data": {"root": str(root), "people_file": str(people), "image_size": SIDE,
                 "min_images": 4},
        "augment": {"flip": True},
        "model": {"name": "small_cnn", "embedding_size": 8, "options": {"width": 8}},
        "loss": {"name": "npair", "l2_reg": 0.02},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "batch": {"p": 4, "k": 2},
        "train": {"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 10,
                  "log_every": 1},
    }
    train(config_from_dict(raw), progress=False)
    return out


def test_select_checkpoint_scores_every_checkpoint_and_picks_the_best(lfw_like, tmp_path):
    root, people = lfw_like
    run = _run(root, people, tmp_path / "run")
    assert trained_identities(run) == {n for n, c in SIZES.items() if c >= 4}
    pairs_file = tmp_path / "val.txt"
    heldout_pairs(root, people, pairs_file, below=4, folds=5, seed=1)
    chosen = select_checkpoint(run, pairs_file, root)
    assert [c.step for c in chosen.scores] == [2, 4, 6]
    pairs = read_lfw_pairs(pairs_file, root)
    same = pairs.is_same
    for c in chosen.scores:
        enc = load_model(c.path, flip_test=True)
        emb = {}
        for p in set(pairs.path_a) | set(pairs.path_b):
            real = p.with_suffix(".png")
            emb[p] = enc.embed_faces([np.asarray(Image.open(real).convert("RGB"))])[0]
        s = np.array([float(np.dot(emb[a].astype(np.float64), emb[b].astype(np.float64)))
                      for a, b in zip(pairs.path_a, pairs.path_b, strict=True)])
        assert c.auc == pytest.approx(roc_auc_score(same, s), abs=1e-6)
        # 5-fold accuracy: accept s > t, t the smallest of the best cuts (between two
        # consecutive training scores) on the other folds, applied to the held-out fold
        accs = []
        for k in range(5):
            test = pairs.fold == k
            u = np.unique(s[~test])
            cuts = [-np.inf, *((u[:-1] + u[1:]) / 2), np.inf]
            correct = [int(((s[~test] > t) == same[~test]).sum()) for t in cuts]
            t = cuts[correct.index(max(correct))]
            accs.append(((s[test] > t) == same[test]).mean())
        assert c.accuracy == pytest.approx(np.mean(accs), abs=1e-12)
    assert chosen.best.accuracy == max(c.accuracy for c in chosen.scores)
    record = json.loads(chosen.json_file.read_text())
    assert record["best_step"] == chosen.best.step
    assert "**chosen**" in chosen.markdown.read_text()

    # the same through the command line: the same pairs for the same seed, the same choice
    from facemetric.cli import main

    again = tmp_path / "val_cli.txt"
    assert main(["heldout-pairs", "--data", str(root), "--people", str(people), "--below", "4",
                 "--folds", "5", "--seed", "1", "--out", str(again)]) == 0
    assert again.read_text() == pairs_file.read_text()
    assert main(["select-checkpoint", str(run), "--pairs", str(again), "--data", str(root),
                 "--out", str(tmp_path / "sel")]) == 0
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["best_step"] == (
        chosen.best.step)
    with Image.open(tmp_path / "sel" / "selection.png") as im:  # the command also plots
        assert im.format == "PNG"
    coarse = select_checkpoint(run, pairs_file, root, out_dir=tmp_path / "coarse", every=4)
    assert [c.step for c in coarse.scores] == [4, 6]  # step 4, and the last
    assert [c.accuracy for c in coarse.scores] == [c.accuracy for c in chosen.scores[1:]]


def test_select_checkpoint_refuses_pairs_of_trained_identities(lfw_like, tmp_path):
    root, people = lfw_like
    run = _run(root, people, tmp_path / "run")
    trained = sorted(n for n, c in SIZES.items() if c >= 4)
    bad = tmp_path / "bad.txt"
    bad.write_text(f"2\t1\n{trained[0]}\t1\t2\n{trained[1]}\t1\t{trained[2]}\t1\n"
                   f"{trained[3]}\t1\t2\n{trained[4]}\t1\t{trained[5]}\t1\n")
    with pytest.raises(ValueError, match="trained on"):
        select_checkpoint(run, bad, root)


def test_plot_selection_draws_the_scores_the_choice_and_a_monitor(tmp_path, keep_figures):
    figures = keep_figures(plots)
    scores = tuple(CheckpointScore(step, tmp_path / f"c{step}.pt", acc, std, auc)
                   for step, acc, std, auc in [(100, 0.80, 0.02, 0.90), (200, 0.86, 0.01, 0.93),
                                               (300, 0.84, 0.03, 0.95)])
    selection = Selection(scores, scores[1], 380, tmp_path / "s.md", tmp_path / "s.json")
    png = plot_selection(selection, tmp_path / "s.png",
                         monitor={"test pairs": ([100, 200, 300], [0.81, 0.85, 0.88])})
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.text["Title"] == "Checkpoint selection on held-out identities"
    left, right = figures[0].axes
    lines = {line.get_label(): line for line in left.get_lines()}
    held = lines["held-out identities (380 pairs)"]
    assert list(held.get_xdata()) == [100, 200, 300]
    np.testing.assert_allclose(held.get_ydata(), [80.0, 86.0, 84.0])
    star = lines["chosen: step 200"]
    assert list(star.get_xdata()) == [200]
    np.testing.assert_allclose(star.get_ydata(), [86.0])
    np.testing.assert_allclose(lines["test pairs"].get_ydata(), [81.0, 85.0, 88.0])
    np.testing.assert_allclose(right.get_lines()[0].get_ydata(), [0.90, 0.93, 0.95])
    band = left.collections[0].get_paths()[0].vertices[:, 1]  # accuracy ± fold std
    assert band.min() == pytest.approx(78.0) and band.max() == pytest.approx(87.0)

    with pytest.raises(ValueError, match="2 steps but 3"):
        plot_selection(selection, tmp_path / "x.png", monitor={"m": ([1, 2], [0.5, 0.5, 0.5])})
    with pytest.raises(ValueError, match="fractions"):
        plot_selection(selection, tmp_path / "x.png", monitor={"m": ([1], [85.0])})
    assert not (tmp_path / "x.png").exists()
