"""Verification reports and plots: real PNGs, strict JSON equal to the report, readable
markdown, atomic writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from facemetric.evaluation import cmc_curve, verification_report
from facemetric.evaluation.plots import _roc_polyline, plot_cmc, plot_roc, plot_score_histograms
from facemetric.evaluation.report import (
    ReportFiles,
    _json_safe,
    comparison_table,
    write_verification_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path: Path, title: str | None = None) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 200
    rgb = image[..., :3]
    assert rgb.std() > 0.03  # not a blank canvas
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20  # lines, text, fills
    if title is not None:
        with Image.open(path) as im:
            assert im.text.get("Title") == title


def strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def pairs() -> tuple[np.ndarray, np.ndarray]:
    """300 + 300 interleaved pairs, positives shifted up: every FAR < 1/300 unresolvable."""
    rng = np.random.default_rng(7)
    same = np.arange(600) % 2 == 0
    scores = rng.normal(0.0, 1.0, 600) + 1.8 * same
    return scores, same


@pytest.fixture
def cmc():
    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(25, 8))
    probes = gallery + 0.9 * rng.normal(size=(25, 8))
    labels = np.arange(25)
    return cmc_curve(gallery, labels, probes, labels)


# --------------------------------------------------------------------------- plots


def test_plots_write_real_pngs(tmp_path, pairs, cmc):
    scores, same = pairs
    report = verification_report(scores, same)
    weaker = verification_report(scores * 0.3 + np.random.default_rng(0).normal(size=600), same)
    out = plot_roc({"model A": report, "model B": weaker}, tmp_path / "roc.png", title="T1")
    assert out == tmp_path / "roc.png"
    assert_real_png(out, "T1")
    assert_real_png(plot_roc(report, tmp_path / "roc1.png"), "ROC")
    out = plot_score_histograms(scores, same, 0.9, tmp_path / "sub" / "h.png", title="H")
    assert_real_png(out, "H")  # missing parent directories are created
    assert_real_png(plot_cmc({"a": cmc, "b": cmc}, tmp_path / "cmc.png", max_rank=10), "CMC")
    assert_real_png(plot_cmc(cmc, tmp_path / "cmc_long.png", max_rank=1000))
    assert leftovers(tmp_path) == []


def test_plot_inputs_are_checked(tmp_path, pairs, cmc):
    scores, same = pairs
    report = verification_report(scores, same)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_roc({}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="CMCCurve"):
        plot_cmc({"a": report}, tmp_path / "x.png")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="max_rank"):
        plot_cmc(cmc, tmp_path / "x.png", max_rank=0)
    with pytest.raises(ValueError, match="NaN"):
        plot_score_histograms(np.r_[scores[:-1], np.nan], same, 0.0, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("num_pairs", [40, 20_000])  # direct points, and the resampled grid
def test_roc_polyline_is_tar_at_far_above_the_resolution(num_pairs):
    rng = np.random.default_rng(num_pairs)
    same = rng.random(num_pairs) < 0.3
    scores = rng.normal(size=num_pairs) + same
    if num_pairs < 100:
        scores = np.round(scores, 1)  # ties: vertical runs of points at one FAR
    report = verification_report(scores, same, folds=2)
    far, tar = _roc_polyline(report)
    roc = report.roc
    assert far.min() >= 1.0 / roc.num_negatives - 1e-15  # nothing below 1/N is drawn
    assert far.max() == pytest.approx(1.0)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
    if num_pairs > 10_000:
        assert far.shape[0] < roc.far.shape[0] / 4  # resampled
    distinct = np.unique(far)
    for f in distinct[:: max(1, distinct.shape[0] // 100)]:
        # The step curve's height at f is TAR@FAR=f: the best TAR over ROC points (looped
        # here, independently) whose FAR does not exceed f.
        expected = max(tr for fr, tr in zip(roc.far, roc.tar, strict=True) if fr <= f * (1 + 1e-9))
        assert tar[far == f].max() == expected


def test_plotting_failure_leaves_no_partial_file(tmp_path, monkeypatch, pairs):
    scores, same = pairs
    target = tmp_path / "scores.png"
    target.write_bytes(b"previous figure")

    def broken_savefig(self, fname, *args, **kwargs):
        fname.write(PNG_SIGNATURE + b"half an image")
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_score_histograms(scores, same, 0.5, target)
    assert target.read_bytes() == b"previous figure"  # untouched
    with pytest.raises(RuntimeError, match="disk full"):
        plot_roc(verification_report(scores, same), tmp_path / "roc.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.png"]


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch, cmc):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install facemetric\[plot\]"):
        plot_cmc(cmc, tmp_path / "cmc.png")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- report


def test_report_writes_all_files_atomically(tmp_path, pairs, cmc):
    scores, same = pairs
    out = tmp_path / "lfw"
    files = write_verification_report(out, "LFW View 2", scores, same, cmc=cmc)
    assert isinstance(files, ReportFiles)
    expected = {"report.md", "metrics.json", "roc.png", "scores.png", "cmc.png"}
    assert {p.name for p in out.iterdir()} == expected  # no temporary files left
    assert files.markdown == out / "report.md" and files.metrics_json == out / "metrics.json"
    assert files.cmc_png == out / "cmc.png"
    assert_real_png(files.roc_png, "LFW View 2: ROC")
    assert_real_png(files.scores_png, "LFW View 2: pair scores")
    assert_real_png(files.cmc_png, "LFW View 2: CMC")

    no_cmc = write_verification_report(tmp_path / "b", "B", scores, same)
    assert no_cmc.cmc_png is None
    assert not (tmp_path / "b" / "cmc.png").exists()
    assert "cmc.png" not in no_cmc.markdown.read_text(encoding="utf-8")


def test_metrics_json_equals_the_report_and_recomputes(tmp_path, pairs, cmc):
    scores, same = pairs
    report = verification_report(scores, same, folds=10)
    files = write_verification_report(
        tmp_path, "r", scores, same, report, extra={"model": "m"}, cmc=cmc
    )
    data = strict_json(files.metrics_json)
    assert data["num_positives"] == report.num_positives == 300
    assert data["num_negatives"] == report.num_negatives == 300
    for key in ("accuracy", "accuracy_std", "accuracy_sem", "auc", "eer", "eer_threshold"):
        assert data[key] == getattr(report, key), key
    assert data["fold_accuracies"] == report.fold_accuracies.tolist()
    assert data["thresholds"] == report.thresholds.tolist()
    assert data["unresolvable_fars"] == list(report.unresolvable_fars)
    for far, tar in report.tar_at_far.items():
        assert data["tar_at_far"][str(far)] == tar
        assert data["threshold_at_far"][str(far)] == report.threshold_at_far[far]
    assert data["cmc"]["rank1"] == cmc.rank1
    assert data["cmc"]["curve"] == cmc.curve.tolist()
    assert data["extra"] == {"model": "m"}
    assert data["files"] == {"roc": "roc.png", "scores": "scores.png", "cmc": "cmc.png"}

    # Independent recomputation from the JSON alone: each fold's accuracy with its threshold
    # (interleaved folds, i mod 10), their mean and sample std, and the AUC via scikit-learn.
    fold = np.arange(600) % 10
    accs = [
        np.mean((scores[fold == f] >= data["thresholds"][f]) == same[fold == f]) for f in range(10)
    ]
    assert accs == pytest.approx(data["fold_accuracies"], abs=1e-12)
    assert np.mean(accs) == pytest.approx(data["accuracy"], abs=1e-12)
    assert np.std(accs, ddof=1) == pytest.approx(data["accuracy_std"], abs=1e-12)
    assert roc_auc_score(same, scores) == pytest.approx(data["auc"], abs=1e-12)
    finite = [t for t in data["thresholds"] if t is not None]
    assert data["mean_threshold"] == pytest.approx(np.mean(finite))


def test_markdown_shows_the_numbers(tmp_path, pairs, cmc):
    scores, same = pairs
    report = verification_report(scores, same)
    files = write_verification_report(tmp_path, "LFW | DevTest", scores, same, report, cmc=cmc)
    text = files.markdown.read_text(encoding="utf-8")
    assert text.startswith("# LFW | DevTest\n")
    acc = f"{100 * report.accuracy:.2f}% ± {100 * report.accuracy_std:.2f}%"
    assert f"| Accuracy | {acc} |" in text
    assert f"| AUC | {report.auc:.5f} |" in text
    assert f"| EER | {100 * report.eer:.2f}% (threshold {report.eer_threshold:.4f}) |" in text
    for i, (t, a) in enumerate(
        zip(report.thresholds, report.fold_accuracies, strict=True), start=1
    ):
        assert f"| {i} | {t:.4f} | {100 * a:.2f}% |" in text
    tar = report.tar_at_far[0.01]
    assert f"| TAR@FAR=0.01 | {100 * tar:.2f}% (threshold " in text
    # FAR < 1/300 cannot be measured with 300 negatives: said so, with no number.
    for label in ("1e-06", "1e-05", "1e-04", "1e-03"):
        assert f"| TAR@FAR={label} | unresolvable (300 negatives) |" in text
    assert "1/300 = 3.33e-03" in text
    assert f"| 1 | {100 * cmc.rank1:.2f}% |" in text
    assert f"| 5 | {100 * cmc.rank5:.2f}% |" in text
    for png in ("roc.png", "scores.png", "cmc.png"):
        assert f"]({png})" in text
    assert "nan" not in text.lower()


def test_infinite_thresholds_become_null_and_are_explained(tmp_path):
    # Both negatives outscore every positive: accepting everything is best in each fold.
    scores = np.r_[10.0, 11.0, np.linspace(0.0, 1.0, 18)]
    same = np.r_[False, False, np.ones(18, dtype=bool)]
    report = verification_report(scores, same, folds=2)
    assert np.isneginf(report.thresholds).all()
    files = write_verification_report(tmp_path, "degenerate", scores, same, report)
    data = strict_json(files.metrics_json)
    assert data["thresholds"] == [None, None]
    assert data["mean_threshold"] is None
    text = files.markdown.read_text(encoding="utf-8")
    assert "| 1 | −∞ (accept all) |" in text
    assert "Mean finite threshold: —" in text
    assert_real_png(files.scores_png)


def test_extra_is_made_json_safe_or_refused_before_writing(tmp_path, pairs):
    scores, same = pairs
    extra = {
        "model": "iresnet50",
        "train": {"lr": np.float32(0.5), "epochs": np.int64(20), "bad": float("nan")},
        "checkpoint": tmp_path / "ckpt.pt",
        "flags": (True, np.bool_(False)),
        "embedding_mean": np.array([0.25, np.inf]),
    }
    files = write_verification_report(tmp_path / "ok", "x", scores, same, extra=extra)
    data = strict_json(files.metrics_json)
    assert data["extra"] == {
        "model": "iresnet50",
        "train": {"lr": 0.5, "epochs": 20, "bad": None},
        "checkpoint": str(tmp_path / "ckpt.pt"),
        "flags": [True, False],
        "embedding_mean": [0.25, None],
    }
    assert type(data["extra"]["train"]["epochs"]) is int
    text = files.markdown.read_text(encoding="utf-8")
    assert "| model | iresnet50 |" in text and "| train.epochs | 20 |" in text

    with pytest.raises(TypeError, match=r"metrics\['extra'\]\['when'\] is a object"):
        write_verification_report(tmp_path / "bad", "x", scores, same, extra={"when": object()})
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_json_safe_conversions():
    assert _json_safe({1e-3: np.float64(np.nan), "a": [np.int32(3), -np.inf]}) == {
        "0.001": None,
        "a": [3, None],
    }
    assert _json_safe(np.array([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    assert _json_safe(np.bool_(True)) is True
    with pytest.raises(TypeError, match="set"):
        _json_safe({"s": {1, 2}})


def test_report_must_match_the_pairs(tmp_path, pairs):
    scores, same = pairs
    report = verification_report(scores[:100], same[:100])
    with pytest.raises(ValueError, match="not the same pairs"):
        write_verification_report(tmp_path / "r", "r", scores, same, report)
    assert not (tmp_path / "r").exists()


def test_report_failure_leaves_no_report(tmp_path, monkeypatch, pairs):
    scores, same = pairs
    calls = []

    def broken_savefig(self, fname, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the ROC is written, the score histogram fails
            fname.write(b"partial")
            raise OSError("no space left")
        return original(self, fname, *args, **kwargs)

    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="no space"):
        write_verification_report(tmp_path, "r", scores, same)
    # report.md is written last: without it nothing claims to be complete; no temp files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roc.png"]
    assert_real_png(tmp_path / "roc.png")


# --------------------------------------------------------------------------- comparison


def test_comparison_table_flat(pairs):
    scores, same = pairs
    a = verification_report(scores, same)
    rng = np.random.default_rng(1)
    big_same = np.arange(4000) % 2 == 0
    b = verification_report(rng.normal(size=4000) + 2.5 * big_same, big_same)
    table = comparison_table({"LFW": a, "CFP-FP": b})
    lines = table.strip().split("\n")
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["", "pairs", "accuracy", "AUC", "EER"]
    assert "TAR@FAR=1e-03" in header
    col = header.index("TAR@FAR=1e-03")
    row_a = [c.strip() for c in lines[2].strip("|").split("|")]
    row_b = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row_a[0] == "LFW" and row_b[0] == "CFP-FP"
    assert row_a[1] == "300 + 300" and row_b[1] == "2000 + 2000"
    assert row_a[2] == f"{100 * a.accuracy:.2f}% ± {100 * a.accuracy_std:.2f}%"
    assert row_b[3] == f"{b.auc:.5f}"
    assert row_a[col] == "unresolvable (300 negatives)"  # 1e-3 < 1/300
    assert row_b[col] == f"{100 * b.tar_at_far[1e-3]:.2f}%"  # 1e-3 ≥ 1/2000


def test_comparison_table_models_by_datasets(pairs):
    scores, same = pairs
    r1 = verification_report(scores, same)
    r2 = verification_report(scores * 0.5 + np.random.default_rng(2).normal(size=600), same)
    rows = {
        "iresnet50": {"LFW DevTest": r1, "CFP-FF": r2, "CFP-FP": r2},
        "mobilefacenet": {"LFW DevTest": r2, "CFP-FP": r1},
    }
    table = comparison_table(rows)
    lines = table.strip().split("\n")
    assert lines[0] == "| accuracy | LFW DevTest | CFP-FF | CFP-FP |"
    acc = {r: f"{100 * r.accuracy:.2f}% ± {100 * r.accuracy_std:.2f}%" for r in (r1, r2)}
    assert lines[2] == f"| iresnet50 | {acc[r1]} | {acc[r2]} | {acc[r2]} |"
    assert lines[3] == f"| mobilefacenet | {acc[r2]} | — | {acc[r1]} |"
    eer = comparison_table(rows, metric="eer").strip().split("\n")
    assert eer[0].startswith("| EER |")
    assert eer[3] == f"| mobilefacenet | {100 * r2.eer:.2f}% | — | {100 * r1.eer:.2f}% |"
    tar = comparison_table(rows, metric=0.1).strip().split("\n")
    assert tar[0].startswith("| TAR@FAR=0.1 |")
    assert f"| {100 * r1.tar_at_far[0.1]:.2f}% |" in tar[2]
    unresolved = comparison_table(rows, metric=1e-4)
    assert unresolved.count("unresolvable (300 negatives)") == 5
    with pytest.raises(ValueError, match="metric"):
        comparison_table(rows, metric="precision")
    with pytest.raises(ValueError, match="at least one"):
        comparison_table({})
