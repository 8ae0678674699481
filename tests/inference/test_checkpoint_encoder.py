"""Encoders read from training checkpoints, embedding image files, and ``evaluate`` on tiny
synthetic protocols."""

from __future__ import annotations

import json
import pickle
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facemetric.data.images import load_image
from facemetric.data.transforms import eval_transform
from facemetric.evaluation import PairList, read_lfw_pairs, verification_report
from facemetric.evaluation.run import evaluate, visualize_folder
from facemetric.inference import TorchEncoder, embed_files, embed_pairs, load_model
from facemetric.training import config_from_dict, save_checkpoint
from facemetric.training.builders import build_model

SIZE = 32


def _checkpoint(tmp: Path, size: int = SIZE, step: int = 0) -> tuple[Path, nn.Module]:
    """A real checkpoint file (the training code's save function) of a small CNN whose
    batch-norm running statistics are not the defaults, so eval mode matters."""
    config = config_from_dict({
        "seed": 0, "output_dir": str(tmp / "run"),
        "data": {"root": str(tmp), "image_size": size},
        "model": {"name": "small_cnn", "embedding_size": 8, "options": {"width": 4}},
        "loss": {"name": "arcface"},
    })
    torch.manual_seed(1)
    model = build_model(config.model)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    state = {"step": step, "model": model.state_dict(), "config": config.to_dict()}
    return save_checkpoint(state, tmp / "run", step), model.eval()


def _face(rng: np.random.Generator, base: np.ndarray, side: int = SIZE) -> np.ndarray:
    img = np.kron(base, np.ones((side // 4, side // 4, 1))) + rng.normal(0, 20, (side, side, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _lfw_tree(root: Path, people: int = 4, per: int = 3, side: int = SIZE,
              suffix: str = ".png") -> list[str]:
    """``root/Name/Name_000k<suffix>``: a colour pattern per identity plus noise."""
    rng = np.random.default_rng(0)
    names = [f"Person_{i}" for i in range(people)]
    for name in names:
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 256, (4, 4, 3))
        for k in range(1, per + 1):
            Image.fromarray(_face(rng, base, side)).save(root / name / f"{name}_{k:04d}{suffix}")
    return names


def _by_hand(model: nn.Module, paths: list[Path], size: int, flip: bool) -> np.ndarray:
    """Reference: load, eval transform, model in eval mode, optional mirror sum, normalise."""
    t = eval_transform(size)
    rows = []
    model.eval()
    with torch.no_grad():
        for p in paths:
            x = t(load_image(p), np.random.default_rng(0)).unsqueeze(0)
            e = model(x)[0].double()
            if flip:
                e = e + model(torch.flip(x, dims=[3]))[0].double()
            rows.append((e / e.norm()).numpy())
    return np.stack(rows)


def test_round_trip_matches_the_model_run_by_hand(tmp_path):
    names = _lfw_tree(tmp_path / "img", people=2, per=2, side=40)  # resized 40 -> 32
    paths = sorted((tmp_path / "img").glob("*/*.png"))
    ckpt, model = _checkpoint(tmp_path)
    encoder = load_model(ckpt, flip_test=False)
    assert not encoder.model.training
    assert encoder.contract.backbone == "small_cnn" and encoder.contract.input_size == SIZE
    plain = embed_files(encoder, paths, batch_size=3, progress=False)
    np.testing.assert_allclose(plain.embeddings, _by_hand(model, paths, SIZE, flip=False),
                               atol=1e-5)
    flipped = embed_files(load_model(ckpt), paths, batch_size=3, progress=False).embeddings
    np.testing.assert_allclose(flipped, _by_hand(model, paths, SIZE, flip=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(flipped, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(plain.embeddings, flipped, atol=1e-3)  # the mirror really was used
    assert len(names) == 2 and plain.failures == ()
    # a run folder means its newest checkpoint
    assert load_model(tmp_path / "run").contract.extra["checkpoint"] == str(ckpt)


def test_flip_test_is_the_normalised_sum_of_both_embeddings(tmp_path):
    _lfw_tree(tmp_path / "img", people=1, per=3)
    faces = np.stack([load_image(p) for p in sorted((tmp_path / "img").glob("*/*.png"))])
    ckpt, model = _checkpoint(tmp_path)
    with torch.no_grad():
        x = torch.from_numpy(faces).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
        raw_a = model(x).double().numpy()
        raw_b = model(torch.flip(x, dims=[3])).double().numpy()
    total = raw_a + raw_b
    expected = total / np.linalg.norm(total, axis=1, keepdims=True)
    np.testing.assert_allclose(load_model(ckpt).embed_faces(faces), expected, atol=1e-5)
    a = load_model(ckpt, flip_test=False).embed_faces(faces)
    np.testing.assert_allclose(a, raw_a / np.linalg.norm(raw_a, axis=1, keepdims=True),
                               atol=1e-5)


def test_training_mode_is_restored_and_eval_mode_used(tmp_path):
    _lfw_tree(tmp_path / "img", people=1, per=2)
    paths = sorted((tmp_path / "img").glob("*/*.png"))
    ckpt, model = _checkpoint(tmp_path)
    model.train()
    encoder = TorchEncoder(model, load_model(ckpt, flip_test=False).contract)
    got = embed_files(encoder, paths, progress=False).embeddings
    assert model.training  # given back as it came
    np.testing.assert_allclose(got, _by_hand(model, paths, SIZE, flip=False), atol=1e-5)


def test_unloadable_image_gives_a_nan_row_and_is_reported(tmp_path, caplog):
    _lfw_tree(tmp_path / "img", people=1, per=3)
    good = sorted((tmp_path / "img").glob("*/*.png"))
    broken = tmp_path / "img" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    missing = tmp_path / "img" / "missing.png"
    paths = [good[0], broken, good[1], missing, good[2]]
    encoder = load_model(_checkpoint(tmp_path)[0])
    with caplog.at_level("WARNING"):
        res = embed_files(encoder, paths, batch_size=2, progress=False)
    emb = res.embeddings
    assert np.isnan(emb[[1, 3]]).all()
    assert np.isfinite(emb[[0, 2, 4]]).all()
    np.testing.assert_allclose(emb[[0, 2, 4]],
                               embed_files(encoder, good, progress=False).embeddings,
                               atol=1e-6)  # good rows are not shifted by the failures
    failed = {f.path: f.reason for f in res.failures}
    assert set(failed) == {broken, missing} and all(failed.values())
    assert str(broken) in caplog.text
    # nothing loadable at all: still NaN rows of the model's width, never zeros
    only_bad = embed_files(encoder, [broken], progress=False).embeddings
    assert only_bad.shape == (1, 8) and np.isnan(only_bad).all()


def test_embed_pairs_embeds_each_image_once(tmp_path):
    _lfw_tree(tmp_path / "img", people=2, per=2)
    a, b = sorted((tmp_path / "img").glob("Person_0/*.png")), sorted(
        (tmp_path / "img").glob("Person_1/*.png"))
    pairs = PairList((a[0], a[0], a[1]), (a[1], b[0], b[1]), np.array([1, 0, 0], bool),
                     np.zeros(3, np.int64))
    encoder = load_model(_checkpoint(tmp_path)[0])
    seen: list[int] = []
    encoder.model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    result = embed_pairs(encoder, pairs, progress=False)
    assert sum(seen) == 2 * 4  # 4 distinct images, each with its mirror
    assert result.embeddings.shape == (4, 8)
    e = {p: result.embeddings[i] for i, p in enumerate(result.images)}
    expected = [float(e[x] @ e[y]) for x, y in zip(pairs.path_a, pairs.path_b, strict=True)]
    np.testing.assert_allclose(result.scores(), expected, atol=1e-6)
    assert result.valid.all()


def test_real_lfw_dev_test_pairs_embed(lfw_root, tmp_path):
    pairs = read_lfw_pairs(lfw_root / "pairsDevTest.txt", lfw_root / "lfw-deepfunneled")
    assert len(pairs) == 1000
    pick = [0, 1, 2, 500, 501, 502]  # three matched, three mismatched
    subset = PairList(tuple(pairs.path_a[i] for i in pick), tuple(pairs.path_b[i] for i in pick),
                      pairs.is_same[pick], pairs.fold[pick])
    ckpt, model = _checkpoint(tmp_path)
    result = embed_pairs(load_model(ckpt), subset, progress=False)
    assert result.failures == ()
    scores = result.scores()
    assert scores.shape == (6,) and np.isfinite(scores).all() and (np.abs(scores) <= 1).all()
    reference = _by_hand(model, list(result.images[:2]), SIZE, flip=True)
    np.testing.assert_allclose(result.embeddings[:2], reference, atol=1e-5)


# ------------------------------------------------------------------ evaluate


def _pairs_view1(path: Path, names: list[str], per: int) -> tuple[list, list]:
    """A View-1 file: all matched pairs, then as many mismatched ones."""
    matched = [(n, i, j) for n in names for i in range(1, per + 1) for j in range(i + 1, per + 1)]
    mismatched = []
    for k, n in enumerate(names):
        for m in names[k + 1:]:
            mismatched.append((n, 1 + k % per, m, 1 + (k + 1) % per))
    mismatched = mismatched[: len(matched)]
    matched = matched[: len(mismatched)]
    lines = [str(len(matched))] + [" ".join(map(str, t)) for t in matched + mismatched]
    path.write_text("\n".join(lines) + "\n")
    return matched, mismatched


def _scores_by_hand(model: nn.Module, root: Path, matched: list, mismatched: list) -> np.ndarray:
    def p(name: str, k: int) -> Path:
        return root / name / f"{name}_{k:04d}.png"

    pa = [p(n, i) for n, i, _ in matched] + [p(n, i) for n, i, _, _ in mismatched]
    pb = [p(n, j) for n, _, j in matched] + [p(m, j) for _, _, m, j in mismatched]
    ea, eb = _by_hand(model, pa, SIZE, True), _by_hand(model, pb, SIZE, True)
    return (ea * eb).sum(axis=1)


def test_evaluate_lfw_view1_matches_an_independent_report(tmp_path, capsys):
    names = _lfw_tree(tmp_path / "aligned", people=5, per=3)  # .png: the .jpg names fall back
    matched, mismatched = _pairs_view1(tmp_path / "pairsDevTest.txt", names, per=3)
    ckpt, model = _checkpoint(tmp_path)
    result = evaluate(ckpt, data_root=tmp_path / "aligned", pairs_file=tmp_path /
                      "pairsDevTest.txt", out_dir=tmp_path / "out", folds=5, progress=False)
    scores = _scores_by_hand(model, tmp_path / "aligned", matched, mismatched)
    same = np.r_[np.ones(len(matched), bool), np.zeros(len(mismatched), bool)]
    expected = verification_report(scores, same, 5)  # interleaved: pair i in fold i mod 5
    assert result.report.accuracy == pytest.approx(expected.accuracy)
    assert result.report.auc == pytest.approx(expected.auc)
    np.testing.assert_allclose(result.report.fold_accuracies, expected.fold_accuracies)
    for f in ("report.md", "metrics.json", "roc.png", "scores.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(expected.accuracy)
    assert metrics["num_folds"] == 5 and metrics["extra"]["dropped_pairs"] == 0
    assert result.dropped_pairs == 0 and result.failures == ()
    assert "accuracy" in result.summary()


def test_evaluate_view2_folds_and_dropped_pairs(tmp_path):
    names = _lfw_tree(tmp_path / "aligned", people=4, per=3)
    body = []
    for fold in range(2):
        body += [f"{names[fold]} 1 2", f"{names[fold]} 2 3", f"{names[fold + 2]} 1 3"]
        body += [f"{names[0]} {1 + fold} {names[1]} 1", f"{names[2]} 1 {names[3]} 2",
                 f"{names[1]} 3 {names[3]} {1 + fold}"]
    (tmp_path / "pairs.txt").write_text("2 3\n" + "\n".join(body) + "\n")
    broken = tmp_path / "aligned" / names[3] / f"{names[3]}_0002.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ckpt, model = _checkpoint(tmp_path)
    result = evaluate(ckpt, data_root=tmp_path / "aligned", pairs_file=tmp_path / "pairs.txt",
                      out_dir=tmp_path / "out", progress=False)
    assert len(result.report.fold_accuracies) == 2  # View 2: the file's own folds
    # Person_3 image 2 sits in three pairs (one in fold 1, two in fold 2)
    assert result.dropped_pairs == 3 and result.num_pairs == 12
    assert [f.path for f in result.failures] == [broken]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_pairs"] == 9 and metrics["extra"]["failed_images"] == 1
    assert str(broken) in (tmp_path / "out" / "report.md").read_text()
    assert "WARNING" in result.summary()
    # the report covers exactly the other nine pairs, scored as by hand, in their folds
    kept = [(i, ln.split()) for i, ln in enumerate(body) if f"{names[3]} 2" not in ln]
    matched = [(f[0], int(f[1]), int(f[2])) for _, f in kept if len(f) == 3]
    mismatched = [(f[0], int(f[1]), f[2], int(f[3])) for _, f in kept if len(f) == 4]
    by_kind = _scores_by_hand(model, tmp_path / "aligned", matched, mismatched)
    is_match = [len(f) == 3 for _, f in kept]
    order = np.r_[np.flatnonzero(is_match), np.flatnonzero(~np.array(is_match))]
    scores = np.empty(len(kept))
    scores[order] = by_kind
    expected = verification_report(scores, is_match, [i // 6 for i, _ in kept])
    assert result.report.accuracy == pytest.approx(expected.accuracy)
    assert result.report.auc == pytest.approx(expected.auc)


def test_evaluate_gallery_probe_cmc_and_open_set(tmp_path):
    rng = np.random.default_rng(3)
    bases = {f"id{i}": rng.integers(0, 256, (4, 4, 3)) for i in range(4)}
    for tree, ids, count in (("gallery", ["id0", "id1", "id2"], 1),
                             ("probe", ["id0", "id1", "id2", "id3"], 2)):
        for name in ids:
            (tmp_path / tree / name).mkdir(parents=True)
            for k in range(count):
                Image.fromarray(_face(rng, bases[name])).save(tmp_path / tree / name / f"{k}.png")
    ckpt, model = _checkpoint(tmp_path)
    result = evaluate(ckpt, gallery=tmp_path / "gallery", probe=tmp_path / "probe",
                      out_dir=tmp_path / "out", folds=2, progress=False)
    g = sorted((tmp_path / "gallery").glob("*/*.png"))
    p = sorted((tmp_path / "probe").glob("id[012]/*.png"))
    ge, pe = _by_hand(model, g, SIZE, True), _by_hand(model, p, SIZE, True)
    nearest = np.array([g[i].parent.name for i in (pe @ ge.T).argmax(axis=1)])
    truth = np.array([q.parent.name for q in p])
    assert result.cmc is not None
    assert result.cmc.rank1 == pytest.approx(float((nearest == truth).mean()))
    assert result.open_set is not None and result.open_set.num_nonmated == 2
    assert result.report.num_positives == 6 and result.report.num_negatives == 18
    assert (tmp_path / "out" / "cmc.png").is_file()
    assert "open_set" in json.loads((tmp_path / "out" / "metrics.json").read_text())["extra"]


def test_evaluate_bin_decodes_images(tmp_path):
    rng = np.random.default_rng(5)
    bases = [rng.integers(0, 256, (4, 4, 3)) for _ in range(6)]
    arrays, same = [], []
    for i in range(10):
        a, b = (i % 6, i % 6) if i % 2 == 0 else (i % 6, (i + 1) % 6)
        arrays += [_face(rng, bases[a]), _face(rng, bases[b])]
        same.append(a == b)
    encoded = []
    for arr in arrays:
        buf = BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    (tmp_path / "set.bin").write_bytes(pickle.dumps((encoded, same), protocol=2))
    ckpt, model = _checkpoint(tmp_path)
    result = evaluate(ckpt, bin_file=tmp_path / "set.bin", out_dir=tmp_path / "out",
                      progress=False)
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
    e = _by_hand(model, [tmp_path / f"{i}.png" for i in range(20)], SIZE, True)
    scores = (e[0::2] * e[1::2]).sum(axis=1)
    folds = (np.arange(10) * 10) // 10
    expected = verification_report(scores, np.array(same), folds)
    assert result.report.accuracy == pytest.approx(expected.accuracy)
    assert result.report.auc == pytest.approx(expected.auc)


def test_evaluate_cfp_maps_paths_into_the_aligned_tree(tmp_path):
    cfp, aligned = tmp_path / "cfp", tmp_path / "aligned"
    rng = np.random.default_rng(7)
    lines = []
    for person in range(1, 4):
        base = rng.integers(0, 256, (4, 4, 3))
        for k in range(1, 3):
            rel = Path(f"{person:03d}/frontal/{k:02d}.jpg")
            (aligned / rel.parent).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_face(rng, base)).save(aligned / rel)
            lines.append(f"{len(lines) + 1} ../Data/Images/{rel.as_posix()}")
    (cfp / "Protocol").mkdir(parents=True)
    (cfp / "Protocol" / "Pair_list_F.txt").write_text("\n".join(lines) + "\n")
    for fold, (same, diff) in enumerate(((["1,2", "3,4"], ["1,3", "2,5"]),
                                         (["5,6", "3,4"], ["4,6", "1,5"])), 1):
        d = cfp / "Protocol" / "Split" / "FF" / f"{fold:02d}"
        d.mkdir(parents=True)
        (d / "same.txt").write_text("\n".join(same) + "\n")
        (d / "diff.txt").write_text("\n".join(diff) + "\n")
    ckpt, _ = _checkpoint(tmp_path)
    result = evaluate(ckpt, cfp_root=cfp, protocol="FF", data_root=aligned,
                      out_dir=tmp_path / "out", progress=False)
    assert result.failures == () and result.num_images == 6
    assert len(result.report.fold_accuracies) == 2 and result.report.num_positives == 4


def test_evaluate_refuses_ambiguous_sources(tmp_path):
    ckpt, _ = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match="exactly one source"):
        evaluate(ckpt, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="exactly one source"):
        evaluate(ckpt, pairs_file=tmp_path / "p.txt", bin_file=tmp_path / "b.bin",
                 out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="data_root"):
        evaluate(ckpt, pairs_file=tmp_path / "p.txt", out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="both"):
        evaluate(ckpt, gallery=tmp_path, out_dir=tmp_path / "o")


def test_visualize_folder_keeps_the_largest_identities(tmp_path):
    _lfw_tree(tmp_path / "img", people=4, per=3)
    for extra in (tmp_path / "img" / "Person_2").glob("*_0003.png"):
        extra.unlink()
    ckpt, _ = _checkpoint(tmp_path)
    png, failures = visualize_folder(ckpt, tmp_path / "img", tmp_path / "map.png",
                                     max_identities=3, progress=False)
    assert png.stat().st_size > 0 and failures == ()
    title = Image.open(png).info.get("Title", "")
    assert "9 points" in title and "3 identities" in title  # Person_2 (2 images) left out


def test_loading_reads_the_backbone_only_not_the_class_centres(tmp_path):
    """A checkpoint holding 400 MB of class centres (200k identities × 512, as a Partial FC
    run's loss state) loads for inference without reading them: the loading process's peak
    memory grows by far less than the centres' size."""
    import subprocess
    import sys

    ckpt, _ = _checkpoint(tmp_path)
    state = torch.load(ckpt, weights_only=True)
    state["loss"] = {"weight": torch.ones(200_000, 512)}
    big = tmp_path / "big" / "checkpoint_000000001.pt"
    big.parent.mkdir()
    torch.save(state, big)
    code = (
        "import resource, sys\n"
        "from facemetric.inference import load_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"enc = load_model({str(big)!r})\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) // 1024, enc.contract.embedding_size)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    grown_mib, dim = int(out[0]), int(out[1])
    assert dim == 8
    assert grown_mib < 100, f"loading grew peak memory by {grown_mib} MiB (centres: 390 MiB)"
