"""The uniform average of a run's checkpoints (``facemetric average``): the mean of the stored
weights against a float64 loop over the files, the written file loads as a model and never as
a checkpoint to resume from, the choice of the tail, and every refusal."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facemetric.cli import main
from facemetric.inference import load_model, sha256_of_tensors
from facemetric.inference.checkpoint import newest_checkpoint
from facemetric.models import SmallFaceCNN
from facemetric.training import latest_checkpoint, train
from facemetric.training.averaging import (
    average_checkpoints,
    default_average_name,
    recompute_average_batchnorm,
    save_average,
    tail_checkpoints,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_batchnorm_statistics import conv3x3_channel_moments  # a float64 loop convolution
from test_loop import _config, _make_folder  # the loop tests' synthetic faces and config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real 12-step run with a checkpoint every 2 steps (all six kept) and an EMA."""
    torch.set_num_threads(1)
    faces = _make_folder(tmp_path_factory.mktemp("faces"), seed=6)
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = _config(faces, out, max_steps=12, checkpoint_every=2, keep_checkpoints=10,
                  ema_decay=0.9)
    result = train(cfg, progress=False)
    return result.output_dir


def _stored(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _mean_loop(paths: list[Path]) -> dict[str, np.ndarray]:
    """The float64 mean of the floating-point weights, entry by entry in NumPy."""
    states = [_stored(p) for p in paths]
    out = {}
    for key, value in states[0].items():
        if not value.is_floating_point():
            continue
        acc = np.zeros(value.shape, dtype=np.float64)
        for state in states:
            acc += state[key].numpy().astype(np.float64)
        out[key] = acc / len(states)
    return out


def test_the_average_is_the_mean_of_the_stored_weights(run):
    paths = [run / f"checkpoint_{s:09d}.pt" for s in (6, 8, 10, 12)]
    averaged = average_checkpoints(paths)
    want = _mean_loop(paths)
    assert set(averaged.weights) == set(_stored(paths[0]))
    for key, value in want.items():
        got = averaged.weights[key]
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), value, rtol=1e-6, atol=1e-7, err_msg=key)
    # the checkpoints differ, so the mean is none of them
    spread = max(float((_stored(paths[0])[k] - _stored(paths[-1])[k]).abs().max())
                 for k in want)
    assert spread > 1e-3
    # BatchNorm's running statistics are averaged; its integer counter is the last one's
    bn_means = [k for k in want if k.endswith("running_mean")]
    assert bn_means
    last = _stored(paths[-1])
    for key, value in last.items():
        if not value.is_floating_point():
            assert torch.equal(averaged.weights[key], value), key
    assert averaged.steps == (6, 8, 10, 12)
    assert averaged.files == tuple(p.name for p in paths)
    assert averaged.config == torch.load(paths[-1], weights_only=True)["config"]


def test_the_order_of_the_files_does_not_matter(run):
    paths = [run / f"checkpoint_{s:09d}.pt" for s in (4, 8, 12)]
    a = average_checkpoints(paths)
    b = average_checkpoints(list(reversed(paths)))
    assert a.steps == b.steps == (4, 8, 12)
    for key, value in a.weights.items():
        torch.testing.assert_close(b.weights[key], value, rtol=1e-6, atol=1e-7)


def test_one_checkpoint_averages_to_itself_exactly(run):
    path = run / "checkpoint_000000010.pt"
    averaged = average_checkpoints([path])
    for key, value in _stored(path).items():
        assert torch.equal(averaged.weights[key], value), key


def test_the_written_file_loads_as_a_model_and_not_as_a_run_to_resume(run, tmp_path):
    paths = tail_checkpoints(run, from_step=8)
    averaged = average_checkpoints(paths)
    out = save_average(averaged, run / default_average_name(averaged))
    assert out.name == "averaged_000000008-000000012.pt"
    stored = torch.load(out, weights_only=True)
    assert stored["averaged_from"] == {"method": "uniform", "steps": [8, 10, 12],
                                       "files": [p.name for p in paths],
                                       "batchnorm": "averaged"}
    # a resumed run and "the newest checkpoint of a folder" ignore it
    assert latest_checkpoint(run).name == "checkpoint_000000012.pt"
    assert newest_checkpoint(run).name == "checkpoint_000000012.pt"
    # load_model reads the averaged weights: the same embeddings as a network given them
    encoder = load_model(out, flip_test=False)
    assert encoder.contract.weights_sha256 == sha256_of_tensors(averaged.weights)
    assert encoder.contract.input_size == 32 and encoder.contract.embedding_size == 16
    net = SmallFaceCNN(16, in_channels=3, width=8)
    net.load_state_dict(averaged.weights)
    faces = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    got = encoder.embed_faces(faces)
    reference = load_model(run / "checkpoint_000000012.pt", flip_test=False).embed_faces(faces)
    assert not np.allclose(got, reference, atol=1e-4)  # not the last checkpoint's model
    net.eval()
    from facemetric.inference.encoder import input_tensor

    with torch.no_grad():
        want = net(torch.from_numpy(input_tensor(faces, encoder.contract))).numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_tail_is_chosen_by_fraction_or_by_steps(run):
    def steps(paths: list[Path]) -> list[int]:
        return [int(p.stem.split("_")[1]) for p in paths]

    assert steps(tail_checkpoints(run)) == [2, 4, 6, 8, 10, 12]
    assert steps(tail_checkpoints(run, last_fraction=0.5)) == [6, 8, 10, 12]
    assert steps(tail_checkpoints(run, last_fraction=1 / 3)) == [8, 10, 12]
    assert steps(tail_checkpoints(run, last_fraction=1.0)) == [2, 4, 6, 8, 10, 12]
    assert steps(tail_checkpoints(run, from_step=3, to_step=9)) == [4, 6, 8]
    assert steps(tail_checkpoints(run, to_step=4)) == [2, 4]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"last_fraction": 0.0}, r"must lie in \(0, 1\]"),
    ({"last_fraction": 1.5}, r"must lie in \(0, 1\]"),
    ({"last_fraction": 0.5, "to_step": 10}, "not both"),
    ({"from_step": 13}, r"no checkpoint .* lies in steps 13–12 \(it has steps 2–12, 6 files\)"),
])
def test_a_bad_tail_is_refused(run, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tail_checkpoints(run, **kwargs)


def test_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        tail_checkpoints(tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints([])


def test_checkpoints_that_cannot_be_averaged_are_refused(run, tmp_path):
    good = run / "checkpoint_000000012.pt"
    with pytest.raises(ValueError, match="two checkpoints of step 12"):
        average_checkpoints([good, good])
    # a NaN in one file
    state = torch.load(good, weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    poisoned = state["model"][key].clone(memory_format=torch.contiguous_format)
    poisoned.view(-1)[0] = float("nan")
    state["model"][key] = poisoned
    state["step"] = 14
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=f"non-finite weights \\({key}"):
        average_checkpoints([good, tmp_path / "nan.pt"])
    # another backbone: other options, other shapes
    other = torch.load(good, weights_only=True)
    other["config"]["model"]["options"] = {"width": 4}
    other["model"] = SmallFaceCNN(16, in_channels=3, width=4).state_dict()
    other["step"] = 16
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another backbone"):
        average_checkpoints([good, tmp_path / "other.pt"])
    # same declared backbone, other tensors (a foreign or edited file)
    other["config"] = state["config"]
    torch.save(other, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="other weight names, shapes or dtypes"):
        average_checkpoints([good, tmp_path / "edited.pt"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        average_checkpoints([good, tmp_path / "junk.pt"])


def test_the_command_writes_the_average_and_explains_a_bad_range(run, tmp_path, capsys):
    out = tmp_path / "avg.pt"
    assert main(["average", str(run), "--last-fraction", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "averaged 4 checkpoints" in printed and "steps 6–12" in printed
    assert torch.load(out, weights_only=True)["averaged_from"]["steps"] == [6, 8, 10, 12]
    assert main(["average", str(run), "--from-step", "20"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["average", str(tmp_path / "missing")]) == 2


def _first_batchnorm_statistics(folder: Path, weights: dict[str, torch.Tensor]) -> tuple[
        np.ndarray, np.ndarray]:
    """The first BatchNorm's inputs over every image of ``folder`` (PNG read by PIL, scaled to
    ``[-1, 1]``), convolved in float64 by explicit loops: mean and unbiased variance."""
    from PIL import Image

    files = sorted(folder.glob("*/*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in files])
    x = (x / 255.0 - 0.5) / 0.5
    return conv3x3_channel_moments(x.transpose(0, 3, 1, 2),
                                   weights["features.0.weight"].numpy())


def test_the_command_recomputes_batchnorm_over_the_runs_own_images(run, tmp_path, capsys):
    out = tmp_path / "avg_bn.pt"
    plain = average_checkpoints(tail_checkpoints(run, last_fraction=0.5))
    assert main(["average", str(run), "--last-fraction", "0.5", "--recompute-batchnorm",
                 "--out", str(out)]) == 0
    assert "BatchNorm statistics recomputed over 24 images" in capsys.readouterr().out
    stored = torch.load(out, weights_only=True)
    record = stored["averaged_from"]["batchnorm"]
    faces = Path(plain.config["data"]["root"])
    assert record["images"] == 24 and record["root"] == str(faces) and record["unreadable"] == []
    weights = stored["model"]
    running = {k for k in weights if k.endswith(("running_mean", "running_var"))}
    assert len(running) == 8
    for key, value in plain.weights.items():  # everything else is the plain average
        if key not in running:
            assert torch.equal(weights[key], value), key
    mean, var = _first_batchnorm_statistics(faces, plain.weights)
    np.testing.assert_allclose(weights["features.1.running_mean"].numpy(), mean, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(weights["features.1.running_var"].numpy(), var, rtol=1e-4)
    assert not np.allclose(plain.weights["features.1.running_var"].numpy(), var, rtol=1e-2)
    assert load_model(out).contract.weights_sha256 == sha256_of_tensors(weights)


def test_the_command_refuses_images_it_cannot_find_or_would_not_use(run, tmp_path, capsys):
    args = ["average", str(run), "--out", str(tmp_path / "x.pt")]
    assert main([*args, "--recompute-batchnorm", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere (for --data" in capsys.readouterr().err
    assert main([*args, "--data", str(tmp_path)]) == 2
    assert "add that flag or drop them" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_shuffled_small_batches_still_see_every_image_once(run):
    plain = average_checkpoints(tail_checkpoints(run, last_fraction=0.5))
    faces = Path(plain.config["data"]["root"])
    mean, var = _first_batchnorm_statistics(faces, plain.weights)
    for seed in (0, 1):
        renewed = recompute_average_batchnorm(plain, faces, min_images=2, batch_size=5,
                                              seed=seed)
        assert renewed.batchnorm is not None and renewed.batchnorm["images"] == 24
        np.testing.assert_allclose(renewed.weights["features.1.running_mean"].numpy(), mean,
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(renewed.weights["features.1.running_var"].numpy(), var,
                                   rtol=1e-4)
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        recompute_average_batchnorm(plain, faces, batch_size=1)
