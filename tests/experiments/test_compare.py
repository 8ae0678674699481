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
from facemetric.training import load_checkpoint, load_config

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


def test_each_held_out_check_is_printed_while_the_run_trains(setup, tmp_path, capsys):
    # A 60-minute run's periodic checks used to reach only its record, written at the end.
    tmp = setup["tmp"]
    result = compare([setup["cosface"]], out_dir=tmp_path / "out", budget_steps=2,
                     eval_every=1, eval_pairs=tmp / "pairs.txt", eval_root=tmp / "held",
                     eval_folds=2, seed=7, progress=True)
    err = capsys.readouterr().err
    run = result.runs[0]
    assert run.eval_steps == [0, 1, 2]
    for step, accuracy in zip(run.eval_steps, run.eval_accuracy, strict=True):
        assert (f"cosface: step {step}, " in err
                and f"held-out accuracy {100 * accuracy:.1f}% (no flip test)" in err)


def test_wall_time_budget_stops_runs(setup):
    tmp = setup["tmp"]
    result = compare([setup["cosface"]], out_dir=tmp / "timed", budget_seconds=1e-6,
                     eval_every=100, seed=0, progress=False)
    (run,) = result.runs
    assert run.stopped_by == "time" and run.steps == 1 and run.final is None
    assert run.eval_steps == []  # no held-out pairs given
    assert "time" in result.table.read_text() and result.plot.is_file()


def test_a_run_stopped_by_time_is_judged_on_the_weights_it_saved(setup, tmp_path):
    """A wall-time stop falls between checkpoints (every 100 steps here): the run still
    ends with a checkpoint of its last step, and the table's numbers are that file's."""
    tmp = setup["tmp"]
    result = compare([setup["cosface"]], out_dir=tmp_path / "timed", budget_seconds=1e-6,
                     eval_every=100, eval_pairs=tmp / "pairs.txt", eval_root=tmp / "held",
                     eval_folds=2, seed=0, progress=False)
    (run,) = result.runs
    assert run.stopped_by == "time" and run.steps == 1 and run.final is not None
    assert run.checkpoint is not None and run.checkpoint.name == "checkpoint_000000001.pt"
    pairs = read_lfw_pairs(tmp / "pairs.txt", tmp / "held", 2)
    model = load_model(run.checkpoint)
    assert model.contract.extra["step"] == 1
    scores = embed_pairs(model, pairs, progress=False).scores()
    record = json.loads((tmp_path / "timed" / "cosface" / "compare_run.json").read_text())
    np.testing.assert_allclose(np.array(record["final_scores"]), scores, atol=1e-6)
    assert run.final.accuracy == pytest.approx(
        verification_report(scores, pairs.is_same, pairs.fold).accuracy)
    again = compare([setup["cosface"]], out_dir=tmp_path / "timed", budget_seconds=1e-6,
                    eval_every=100, eval_pairs=tmp / "pairs.txt", eval_root=tmp / "held",
                    eval_folds=2, seed=0, progress=False)
    assert again.runs[0].steps == 1 and again.runs[0].stopped_by == "time"  # reused


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


AUX_COSFACE = '\n[[aux_loss]]\nname = "cosface"\nweight = 0.5\nscale = 16.0\nmargin = 0.2\n'


def test_compare_trains_a_config_s_aux_losses(setup, tmp_path):
    joint = setup["tmp"] / "triplet_cosface.toml"
    joint.write_text(setup["triplet"].read_text() + AUX_COSFACE)
    result = compare([setup["triplet"], joint], out_dir=tmp_path / "out", budget_steps=3,
                     eval_every=100, seed=7, progress=False)
    plain, both = result.runs
    assert plain.data_order == both.data_order
    # step 1: same initial backbone, same batch; the CosFace term adds 0.5 × a positive value
    assert both.losses[0] > plain.losses[0]
    state = load_checkpoint(both.checkpoint)["loss"]
    assert state["terms.1.weight"].shape == (5, 8)  # centres of the 5 training identities

    no_pk = setup["tmp"] / "cosface_triplet_no_pk.toml"
    no_pk.write_text(setup["cosface"].read_text().replace("p = 3\nk = 2", "size = 6")
                     + AUX_COSFACE.replace('"cosface"', '"triplet"').replace("scale = 16.0\n", ""))
    with pytest.raises(ValueError, match="the pair loss 'triplet' needs"):
        compare([no_pk], out_dir=tmp_path / "x", budget_steps=1)


def test_order_recorder_digest_depends_on_order():
    data = list(range(10))
    a, b, c = _OrderRecorder(data), _OrderRecorder(data), _OrderRecorder(data)
    for i in (3, 1, 2):
        a[i], b[i]
    for i in (1, 3, 2):
        c[i]
    assert a.hexdigest() == b.hexdigest() != c.hexdigest()
    assert a.count == 3 and len(a) == 10
    # the chain continues from a saved state as if never interrupted
    d = _OrderRecorder(data)
    d[3]
    e = _OrderRecorder(data, **d.state())
    for i in (1, 2):
        e[i]
    assert e.hexdigest() == a.hexdigest() and e.count == 3


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


# --------------------------------------------------------------------------- resuming


class _CrashError(Exception):
    """Stands for the process being killed."""


def _compare(setup, out: Path, **kwargs):
    tmp = setup["tmp"]
    options = {"budget_steps": 6, "eval_every": 2, "eval_pairs": tmp / "pairs.txt",
               "eval_root": tmp / "held", "eval_folds": 2, "seed": 7, "checkpoint_every": 2,
               "progress": False, **kwargs}
    return compare([setup["cosface"], setup["triplet"]], out_dir=out, **options)


def _same_results(got, want) -> None:
    for a, b in zip(got.runs, want.runs, strict=True):
        assert a.name == b.name and a.steps == b.steps == 6
        assert a.losses == b.losses  # bitwise
        assert a.eval_steps == b.eval_steps == [0, 2, 4, 6]
        assert a.eval_accuracy == b.eval_accuracy
        assert a.data_order == b.data_order and "(36 reads)" in a.data_order
        assert a.final is not None and b.final is not None
        assert a.final.accuracy == b.final.accuracy and a.final.auc == b.final.auc
        assert len(a.step_wall) == 6 and np.all(np.diff(a.step_wall) >= 0)


@pytest.fixture(scope="module")
def straight(setup):
    return _compare(setup, setup["tmp"] / "straight")


def test_a_killed_compare_reuses_finished_runs_and_resumes_the_unfinished_one(
    setup, straight, tmp_path, monkeypatch
):
    import facemetric.experiments.compare as module

    real_train = module.train_run
    calls: list[tuple[str, int | None]] = []

    def killed_at_step_5_of_triplet(config, **kwargs):
        hook = kwargs["on_step"]

        def on_step(info) -> None:
            hook(info)
            if config.output_dir.name == "triplet" and info.step == 5:
                raise _CrashError  # after the checkpoint and record of step 4

        return real_train(config, **{**kwargs, "on_step": on_step})

    def spy(config, **kwargs):
        run = real_train(config, **kwargs)
        calls.append((config.output_dir.name, run.resumed_from))
        return run

    out = tmp_path / "out"
    monkeypatch.setattr(module, "train_run", killed_at_step_5_of_triplet)
    with pytest.raises(_CrashError):
        _compare(setup, out)
    cosface_record = (out / "cosface" / "compare_run.json").read_text()
    assert json.loads(cosface_record)["status"] == "finished"
    record = json.loads((out / "triplet" / "compare_run.json").read_text())
    assert record["status"] == "running" and record["step"] == 4
    assert record["eval_steps"] == [0, 2, 4] and len(record["losses"]) == 4

    monkeypatch.setattr(module, "train_run", spy)
    again = _compare(setup, out)  # the same command, run again
    assert calls == [("triplet", 4)]  # cosface reused, triplet resumed from its checkpoint
    _same_results(again, straight)
    assert (out / "cosface" / "compare_run.json").read_text() == cosface_record
    assert json.loads((out / "triplet" / "compare_run.json").read_text())["status"] == "finished"
    table = again.table.read_text()
    for run in straight.runs:
        assert run.data_order in table

    calls.clear()  # a third time: nothing left to train
    third = _compare(setup, out)
    assert calls == []
    _same_results(third, straight)


def test_a_checkpoint_newer_than_the_record_is_redone(setup, straight, tmp_path,
                                                      monkeypatch):
    """Killed between the loop's checkpoint of step 4 and the record of step 4: the record
    still says step 2, so the run resumes there (checkpoint 4 is dropped)."""
    import facemetric.experiments.compare as module

    real_write = module._write_record

    def dies_writing_step_4(path, result, *args, **kwargs):
        if result.name == "triplet" and result.steps == 4 and not kwargs["finished"]:
            raise _CrashError
        return real_write(path, result, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(module, "_write_record", dies_writing_step_4)
    with pytest.raises(_CrashError):
        _compare(setup, out)
    assert (out / "triplet" / "checkpoint_000000004.pt").exists()
    assert json.loads((out / "triplet" / "compare_run.json").read_text())["step"] == 2
    monkeypatch.setattr(module, "_write_record", real_write)
    _same_results(_compare(setup, out), straight)


def test_a_folder_from_other_settings_or_another_tool_is_refused(setup, straight, tmp_path):
    with pytest.raises(ValueError, match=r"other settings \(they differ in \['config'\]\)"):
        _compare(setup, setup["tmp"] / "straight", budget_steps=8)
    with pytest.raises(ValueError, match=r"other settings \(they differ in \['eval_every'\]"):
        _compare(setup, setup["tmp"] / "straight", eval_every=3)
    foreign = tmp_path / "foreign"
    (foreign / "cosface").mkdir(parents=True)
    (foreign / "cosface" / "checkpoint_000000002.pt").write_bytes(b"from facemetric train")
    with pytest.raises(FileExistsError, match=r"holds checkpoints but no compare_run\.json"):
        _compare(setup, foreign)


def test_a_record_from_before_a_new_config_field_is_still_reused(setup, tmp_path):
    """A record written before ``[loss] margin_warmup_steps`` existed lacks that key; the run
    used no warm-up, so the record matches a configuration at the default and is reused."""
    out = tmp_path / "old"
    first = _compare(setup, out, budget_steps=2, eval_every=2)
    record_path = out / "cosface" / "compare_run.json"
    record = json.loads(record_path.read_text())
    del record["settings"]["config"]["loss"]["margin_warmup_steps"]
    record_path.write_text(json.dumps(record))
    again = _compare(setup, out, budget_steps=2, eval_every=2)
    assert again.runs[0].losses == first.runs[0].losses
    assert again.runs[0].wall_seconds == first.runs[0].wall_seconds  # reused, not retrained
    record["settings"]["config"]["loss"]["margin_warmup_steps"] = 1  # a warm-up it did use
    record_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"other settings \(they differ in \['config'\]\)"):
        _compare(setup, out, budget_steps=2, eval_every=2)


# --------------------------------------------------------------------------- several seeds


def test_compare_seeds_runs_each_seed_and_summarises_the_real_runs(setup, tmp_path):
    from facemetric.experiments.seeds import compare_seeds

    tmp = setup["tmp"]
    result = compare_seeds([setup["cosface"], setup["triplet"]], out_dir=tmp_path, seeds=[3, 4],
                           budget_steps=3, eval_every=3, eval_pairs=tmp / "pairs.txt",
                           eval_root=tmp / "held", eval_folds=2, progress=False)
    first, second = result.per_seed
    assert (tmp_path / "seed3" / "metrics.json").is_file()
    assert first.runs[0].losses != second.runs[0].losses  # the seed really changed
    finals = [[r.final.accuracy for r in res.runs] for res in result.per_seed]
    cos, trip = result.summaries
    assert cos.final["accuracy"].values == pytest.approx((finals[0][0], finals[1][0]))
    assert trip.difference is not None and trip.paired  # same batches at one seed
    assert trip.difference.values == pytest.approx(
        (finals[0][1] - finals[0][0], finals[1][1] - finals[1][0]))
    # a second call reuses both finished seeds: the same numbers, nothing retrained
    again = compare_seeds([setup["cosface"], setup["triplet"]], out_dir=tmp_path, seeds=[3, 4],
                          budget_steps=3, eval_every=3, eval_pairs=tmp / "pairs.txt",
                          eval_root=tmp / "held", eval_folds=2, progress=False)
    assert [s.final["accuracy"].values for s in again.summaries] == [
        s.final["accuracy"].values for s in result.summaries]
    assert again.per_seed[0].runs[0].wall_seconds == first.runs[0].wall_seconds


def test_compare_judges_a_run_by_its_average_of_the_weights(setup, tmp_path):
    """With ``[train] ema_decay`` the held-out scores are those of the checkpoint's
    ``"model"`` — the average — and not those of the raw weights."""
    import torch

    ema = setup["tmp"] / "cosface_ema.toml"
    ema.write_text(setup["cosface"].read_text().replace(
        'device = "cpu"', 'device = "cpu"\nema_decay = 0.8'))
    tmp = setup["tmp"]
    result = compare([ema], out_dir=tmp_path / "out", budget_steps=4, eval_every=2,
                     eval_pairs=tmp / "pairs.txt", eval_root=tmp / "held", eval_folds=2,
                     seed=7, progress=False)
    (run,) = result.runs
    record = json.loads((tmp_path / "out" / "cosface_ema" / "compare_run.json").read_text())
    got = np.array(record["final_scores"], dtype=np.float64)
    pairs = read_lfw_pairs(tmp / "pairs.txt", tmp / "held", 2)
    averaged = embed_pairs(load_model(run.checkpoint), pairs, progress=False).scores()
    np.testing.assert_allclose(got, averaged, atol=1e-6)
    state = load_checkpoint(run.checkpoint)
    assert state["ema_updates"] == 4
    raw_file = tmp_path / "raw" / "checkpoint_000000004.pt"
    raw_file.parent.mkdir()
    torch.save({**state, "model": state["model_raw"]}, raw_file)
    raw = embed_pairs(load_model(raw_file), pairs, progress=False).scores()
    assert np.abs(raw - averaged).max() > 1e-4  # the two really differ


def test_runs_of_separate_compares_plot_together_from_their_records(setup, tmp_path):
    from facemetric.cli import main
    from facemetric.experiments.compare import recorded_run

    tmp = setup["tmp"]
    common = {"budget_steps": 4, "eval_every": 2, "eval_pairs": tmp / "pairs.txt",
              "eval_root": tmp / "held", "eval_folds": 2, "seed": 7, "progress": False}
    first = compare([setup["cosface"]], out_dir=tmp_path / "one", **common).runs[0]
    second = compare([setup["triplet"]], out_dir=tmp_path / "two", **common).runs[0]
    for run, folder in ((first, tmp_path / "one" / "cosface"),
                        (second, tmp_path / "two" / "triplet")):
        got = recorded_run(folder)
        assert (got.name, got.loss_name, got.steps) == (run.name, run.loss_name, 4)
        assert got.losses == run.losses and got.step_wall == run.step_wall  # exact round trip
        assert got.eval_steps == run.eval_steps == [0, 2, 4]
        assert got.eval_accuracy == run.eval_accuracy
        assert got.stopped_by == "steps" and got.images_per_second == run.images_per_second
    assert recorded_run(tmp_path / "one" / "cosface", "renamed").name == "renamed"

    png = tmp_path / "both.png"
    assert main(["compare-plot", str(tmp_path / "one" / "cosface"),
                 str(tmp_path / "two" / "triplet"), "--out", str(png),
                 "--names", "a", "b", "--title", "two compares"]) == 0
    with Image.open(png) as im:
        assert im.size[0] > im.size[1] > 400
    with pytest.raises(FileNotFoundError, match="not the compare's own --out folder"):
        recorded_run(tmp_path / "one")
    with pytest.raises(SystemExit, match="1 names for 2 runs"):
        main(["compare-plot", str(tmp_path / "one" / "cosface"),
              str(tmp_path / "two" / "triplet"), "--out", str(png), "--names", "a"])
