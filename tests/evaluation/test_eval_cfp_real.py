"""CFP on the real data (``FACEMETRIC_DATA/cfp``): the protocol reader against the released
split files, and a small CFP-FP evaluation of faces aligned from CFP's hand-labelled
fiducials, checked against an independent computation of the same numbers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facemetric.align import align_folder
from facemetric.align.aligner import AlignStatus
from facemetric.evaluation import read_cfp_pairs, verification_report
from facemetric.evaluation.run import evaluate
from facemetric.inference import ModelContract, TorchEncoder

FOLDS, SAME, DIFF = 10, 350, 350  # per fold, as CFP's readme states
IMAGES_PER_IDENTITY = {"frontal": 10, "profile": 4}


def _identity(path: Path) -> str:
    """``.../Images/<NNN>/<frontal|profile>/<k>.jpg`` → ``NNN``."""
    return path.parent.parent.name


def _split_lines(cfp_root: Path, protocol: str, fold: str, kind: str) -> list[tuple[int, int]]:
    text = (cfp_root / "Protocol" / "Split" / protocol / fold / f"{kind}.txt").read_text()
    return [tuple(int(v) for v in line.split(",")) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("protocol", ["FF", "FP"])
def test_cfp_protocol_has_350_same_and_350_diff_pairs_per_fold(cfp_root, protocol):
    pairs = read_cfp_pairs(cfp_root, protocol)
    assert len(pairs) == FOLDS * (SAME + DIFF)
    for fold in range(FOLDS):
        in_fold = pairs.fold == fold
        assert int((pairs.is_same & in_fold).sum()) == SAME
        assert int((~pairs.is_same & in_fold).sum()) == DIFF
    # the same pairs, in order, read straight from the split files: image number n of the
    # frontal list is identity ⌈n/10⌉'s image, of the profile list identity ⌈n/4⌉'s
    second = "frontal" if protocol == "FF" else "profile"
    expected = []
    for fold in sorted(p.name for p in (cfp_root / "Protocol" / "Split" / protocol).iterdir()):
        for kind in ("same", "diff"):
            for i, j in _split_lines(cfp_root, protocol, fold, kind):
                a = (i - 1) // IMAGES_PER_IDENTITY["frontal"] + 1
                b = (j - 1) // IMAGES_PER_IDENTITY[second] + 1
                expected.append((f"{a:03d}", f"{b:03d}", kind == "same"))
    got = [(_identity(a), _identity(b), bool(s))
           for a, b, s in zip(pairs.path_a, pairs.path_b, pairs.is_same, strict=True)]
    assert got == expected
    assert all(same == (a == b) for a, b, same in got)  # "same" means one identity
    assert {p.parent.name for p in pairs.path_a} == {"frontal"}
    assert {p.parent.name for p in pairs.path_b} == {second}
    assert all(p.is_file() for p in {*pairs.path_a[:50], *pairs.path_b[:50]})


def _mini_cfp(cfp_root: Path, dst: Path, per_kind: int) -> list[tuple[Path, Path, bool, int]]:
    """A CFP root under ``dst`` with FP folds 01 and 02 cut to their first ``per_kind`` same
    and diff pairs, and only those pairs' images and fiducials. Returns the pairs as
    ``(frontal rel, profile rel, same, fold)`` relative to ``Data/Images``."""
    proto = dst / "Protocol"
    proto.mkdir(parents=True)
    lists = {}
    for kind, name in (("frontal", "Pair_list_F.txt"), ("profile", "Pair_list_P.txt")):
        text = (cfp_root / "Protocol" / name).read_text()
        (proto / name).write_text(text)
        lists[kind] = {int(n): Path(p).relative_to("../Data/Images")
                       for n, p in (line.split() for line in text.splitlines() if line.strip())}
    chosen = []
    for fold_index, fold in enumerate(("01", "02")):
        (proto / "Split" / "FP" / fold).mkdir(parents=True)
        for kind in ("same", "diff"):
            lines = _split_lines(cfp_root, "FP", fold, kind)[:per_kind]
            (proto / "Split" / "FP" / fold / f"{kind}.txt").write_text(
                "".join(f"{i},{j}\n" for i, j in lines))
            chosen += [(lists["frontal"][i], lists["profile"][j], kind == "same", fold_index)
                       for i, j in lines]
    for rel in {r for a, b, _, _ in chosen for r in (a, b)}:
        for tree, name in (("Images", rel), ("Fiducials", rel.with_suffix(".txt"))):
            target = dst / "Data" / tree / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cfp_root / "Data" / tree / name, target)
    return chosen


class _BlockMeans(nn.Module):
    """A stand-in backbone simple enough to recompute by hand: 7×7 block means per channel
    of the 112×112 input (a 147-d embedding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 7).flatten(1)


def test_cfp_fp_on_faces_aligned_from_fiducials(cfp_root, tmp_path):
    mini = tmp_path / "cfp"
    chosen = _mini_cfp(cfp_root, mini, per_kind=4)
    images = {r for a, b, _, _ in chosen for r in (a, b)}
    assert len(chosen) == 16 and {c[2] for c in chosen} == {True, False}

    aligned = tmp_path / "aligned"
    report = align_folder(mini / "Data" / "Images", aligned, workers=1,
                          landmarks_root=mini / "Data" / "Fiducials", progress=False)
    assert report.total == len(images) and report.failed == 0
    assert report.counts == {AlignStatus.GIVEN_LANDMARKS: len(images)}  # no detection at all
    for rel in images:
        with Image.open(aligned / rel) as im:
            assert im.size == (112, 112) and im.mode == "RGB"

    contract = ModelContract(backbone="block_means", input_size=112, template="arcface112",
                             embedding_size=147, weights_sha256="none", flip_test=False,
                             source="test")
    result = evaluate(TorchEncoder(_BlockMeans(), contract), cfp_root=mini, protocol="FP",
                      data_root=aligned, out_dir=tmp_path / "report", progress=False)
    assert result.num_pairs == 16 and result.dropped_pairs == 0 and not result.failures
    assert result.num_images == len(images)

    # the same numbers, computed here from the aligned files with NumPy alone
    def embedding(rel: Path) -> np.ndarray:
        with Image.open(aligned / rel) as im:
            x = (np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 - 0.5) / 0.5
        return x.reshape(7, 16, 7, 16, 3).mean(axis=(1, 3)).ravel()

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    scores = np.array([cosine(embedding(a), embedding(b)) for a, b, _, _ in chosen])
    same = np.array([c[2] for c in chosen])
    folds = np.array([c[3] for c in chosen])
    want = verification_report(scores, same, folds)
    got = result.report
    assert got.num_positives == want.num_positives == 8
    assert got.auc == pytest.approx(want.auc, abs=1e-9)
    assert got.accuracy == pytest.approx(want.accuracy, abs=1e-9)
    assert got.eer == pytest.approx(want.eer, abs=1e-9)
    np.testing.assert_allclose(got.thresholds, want.thresholds, atol=1e-5)
    assert (tmp_path / "report" / "metrics.json").is_file()
