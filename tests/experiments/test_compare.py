"""``compare``: same data, seed and budget for every configuration; curves, table, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemetric.evaluation import read_lfw_pairs, verification_report
from facemetric.experiments.compare import _OrderRecorder, compare
from facemetric.inference import embed_pairs, load_model
from facemetric.training import load_config

SIDE = 16
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "compare"


def _tree(root: Path, people: int, per: int, seed: int) -> list[str]:
    """``root/Name/Name_000k.png``: a colour pattern per identity plus noise."""
    rng = np.random.default_rng(seed)
    names = [f"P{seed}_{i}" for i in range(people)]
    for name in names:
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 256, (4, 4, 3))
        for k in range(1, per + 1):
            img = np.kron(base, np.ones((SIDE // 4, SIDE // 4, 1))) + rng.normal(0, 20,
                                                                                (SIDE, SIDE, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / name / f"{name}_{k:04d}.jpg", quality=95)
    return names


def _config(path: Path, data: Path, loss: str) -> Path:
    path.write_text(f"""
seed = 123
output_dir = "ignored"
[data]
root = "{data.as_posix()}"
image_size = {SIDE}
min_images = 2
num_workers = 0
[augment]
flip = true
padding = 1
crop_scale = [0.8, 1.0]
[model]
name = "small_cnn"
embedding_size = 8
options = {{ width = 4 }}
[loss]
{loss}
[optimizer]
name = "sgd"
lr = 0.05
[schedule]
name = "constant"
[batch]
p = 3
k = 2
[train]
max_steps = 1000
log_every = 1
device = "cpu"
""")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("compare")
    _tree(tmp / "train", people=5, per=4, seed=1)
    held = _tree(tmp / "held", people=4, per=2, seed=2)
    matched = [f"{n} 1 2" for n in held]
    mismatched = [f"{held[i]} 1 {held[(i + 1) % 4]} 2" for i in range(4)]
    (tmp / "pairs.txt").write_text("4\n" + "\n".join(matched + mismatched) + "\n")
    return {
        "tmp": tmp,
        "cosface": _config(tmp / "cosface.toml", tmp / "train",
                           'name = "cosface"\nscale = 16.0\nmargin = 0.2'),
        "triplet": _config(tmp / "triplet.toml", tmp / "train",
                           'name = "triplet"\nmargin = 0.2\nminer = "semi_hard"'),
    }


def test_compare_two_losses_same_data_order_and_outputs(setup):
    tmp = setup["tmp"]
    result = compare([setup["cosface"], setup["triplet"]], out_dir=tmp / "out", budget_steps=4,
                     eval_every=2, eval_pairs=tmp / "pairs.txt", eval_root=tmp / "held",
                     eval_folds=2, seed=7, progress=False)
    a, b = result.runs
    assert (a.name, b.name) == ("cosface", "triplet")
    assert a.steps == b.steps == 4 and a.stopped_by == b.stopped_by == "steps"
    assert len(a.losses) == 4 and len(a.step_wall) == 4
    assert np.all(np.diff(a.step_wall) >= 0)
    assert a.eval_steps == b.eval_steps == [0, 2, 4]
    # same seed, same P×K settings: both runs read the same samples in the same order
    assert a.data_order is not None and a.data_order == b.data_order
    assert "(24 reads)" in a.data_order  # 4 steps × 6 images
    assert a.losses != b.losses  # ... but they really are different losses
    assert a.images_per_second > 0 and a.wall_seconds > 0

    # the final metrics are those of the final checkpoint, measured independently
    pairs = read_lfw_pairs(tmp / "pairs.txt", tmp / "held", 2)
    emb = load_model(a.checkpoint)
    assert emb.contract.extra["step"] == 4 and emb.contract.embedding_size == 8
    scores = embed_pairs(emb, pairs, progress=False).scores()
    expected = verification_report(scores, pairs.is_same, pairs.fold)
    assert a.final is not None
    assert a.final.accuracy == pytest.approx(expected.accuracy)
    assert a.final.auc == pytest.approx(expected.auc)

    assert result.plot == tmp / "out" / "convergence.png"
    with Image.open(result.plot) as im:
        assert im.size[0] > im.size[1] > 400  # 2×2 panels
    table = result.table.read_text()
    for text in ("| cosface | cosface |", "| triplet | triplet |", "TAR@FAR=1e-3", "img/s",
                 a.data_order):
        assert text in table
    assert table.count(a.data_order) == 2
    metrics = json.loads(result.metrics_json.read_text())
    assert [r["name"] for r in metrics["runs"]] == ["cosface", "triplet"]
    assert metrics["settings"]["seed"] == 7 and metrics["settings"]["budget_steps"] == 4
    assert metrics["runs"][0]["eval"]["steps"] == [0, 2, 4]
    assert metrics["runs"][0]["final"]["accuracy"] == pytest.approx(expected.accuracy)
    # each run's own training output, under the shared seed
    cfg = json.loads((tmp / "out" / "cosface" / "config.json").read_text())
    assert cfg["seed"] == 7 and cfg["train"]["max_steps"] == 4


def test_wall_time_budget_stops_runs(setup):
    tmp = setup["tmp"]
    result = compare([setup["cosface"]], out_dir=tmp / "timed", budget_seconds=1e-6,
                     eval_every=100, seed=0, progress=False)
    (run,) = result.runs
    assert run.stopped_by == "time" and run.steps == 1 and run.final is None
    assert run.eval_steps == []  # no held-out pairs given
    assert "time" in result.table.read_text() and result.plot.is_file()


def test_compare_refuses_bad_setups(setup, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        compare([setup["cosface"]], out_dir=tmp_path)
    with pytest.raises(ValueError, match="go together"):
        compare([setup["cosface"]], out_dir=tmp_path, budget_steps=1, eval_pairs="x.txt")
    other = setup["tmp"] / "other.toml"
    other.write_text(setup["triplet"].read_text().replace(f"image_size = {SIDE}",
                                                          "image_size = 24"))
    with pytest.raises(ValueError, match="different data"):
        compare([setup["cosface"], other], out_dir=tmp_path, budget_steps=1)
    no_pk = setup["tmp"] / "no_pk.toml"
    no_pk.write_text(setup["triplet"].read_text().replace("p = 3\nk = 2", "size = 6"))
    with pytest.raises(ValueError, match="p and k"):
        compare([no_pk], out_dir=tmp_path, budget_steps=1)


def test_order_recorder_digest_depends_on_order():
    data = list(range(10))
    a, b, c = _OrderRecorder(data), _OrderRecorder(data), _OrderRecorder(data)
    for i in (3, 1, 2):
        a[i], b[i]
    for i in (1, 3, 2):
        c[i]
    assert a.digest.hexdigest() == b.digest.hexdigest() != c.digest.hexdigest()
    assert a.count == 3 and len(a) == 10


def test_example_configs_share_everything_but_the_loss():
    files = sorted(CONFIGS.glob("*.toml"))
    assert {f.stem for f in files} >= {"softmax", "cosface", "arcface", "triplet_semihard",
                                       "npair"}
    loaded = [load_config(f) for f in files]  # builds each loss once: names and params valid
    dicts = [c.to_dict() for c in loaded]
    for d in dicts:
        d.pop("loss"), d.pop("output_dir")
    assert all(d == dicts[0] for d in dicts[1:])
    assert all(c.batch.p is not None for c in loaded)  # P×K for all: identical batches
    losses = {c.loss.name: c.loss for c in loaded}
    assert losses["triplet"].miner == "semi_hard"
