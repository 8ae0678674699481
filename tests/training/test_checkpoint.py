"""Checkpoint files: atomic writes, latest/keep-N, RNG state round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from facemetric.training import checkpoint as ck


def _state(value: float) -> dict:
    return {"w": torch.full((3,), value), "step": int(value), "rng": ck.capture_rng_state()}


def test_save_load_latest_and_keep(tmp_path):
    for step in (1, 2, 10, 3):
        ck.save_checkpoint(_state(step), tmp_path, step, keep=3)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3, 10]
    latest = ck.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint_000000010.pt"
    state = ck.load_checkpoint(latest)
    assert state["step"] == 10 and torch.equal(state["w"], torch.full((3,), 10.0))
    assert state["format_version"] == ck.FORMAT_VERSION
    assert ck.latest_checkpoint(tmp_path / "missing") is None


def test_crash_during_write_keeps_previous_checkpoint_and_leaves_no_partial_file(
    tmp_path, monkeypatch
):
    good = ck.save_checkpoint(_state(1), tmp_path, 1)
    before = good.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half the bytes are on disk when the "crash" happens
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(_state(2), tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
    assert good.read_bytes() == before
    assert ck.latest_checkpoint(tmp_path) == good
    assert ck.load_checkpoint(good)["step"] == 1


def test_stale_temp_files_are_ignored_and_cleaned(tmp_path):
    stale = tmp_path / ".tmp-checkpoint_000000003-abc.pt"  # an atomic_write killed mid-save
    stale.write_bytes(b"partial")
    assert ck.latest_checkpoint(tmp_path) is None
    ck.save_checkpoint(_state(4), tmp_path, 4)
    assert not stale.exists()


def test_foreign_files_are_refused(tmp_path):
    path = tmp_path / "checkpoint_000000001.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a facemetric"):
        ck.load_checkpoint(path)


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in NumPy's legacy state
    path = ck.save_checkpoint({"rng": ck.capture_rng_state()}, tmp_path, 1)
    want = (torch.rand(4), np.random.rand(4), np.random.normal(), [random.random() for _ in
                                                                  range(4)])
    torch.rand(100)
    np.random.rand(7)
    random.random()
    ck.restore_rng_state(ck.load_checkpoint(path)["rng"])
    got = (torch.rand(4), np.random.rand(4), np.random.normal(), [random.random() for _ in
                                                                 range(4)])
    assert torch.equal(want[0], got[0])
    np.testing.assert_array_equal(want[1], got[1])
    assert want[2] == got[2] and want[3] == got[3]


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        ck.save_checkpoint({}, tmp_path, 1, keep=0)


def _truncate(path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_a_truncated_checkpoint_is_a_checkpoint_error_with_a_sentence(tmp_path, fraction):
    path = ck.save_checkpoint({"model": {"w": torch.ones(64, 64)}}, tmp_path, 1)
    _truncate(path, fraction)
    with pytest.raises(ck.CheckpointError, match=r"checkpoint_000000001\.pt cannot be read .*"
                                                 r"damaged or truncated") as info:
        ck.load_checkpoint(path)
    assert isinstance(info.value, ValueError)  # what the CLI reports as an error (exit 2)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        ck.load_checkpoint(tmp_path / "checkpoint_000000009.pt")


def test_newest_usable_checkpoint_skips_damaged_and_non_finite_ones(tmp_path, caplog):
    for step in (1, 2, 3, 4):
        ck.save_checkpoint({"model": {"w": torch.full((3,), float(step))}, "loss": {},
                            "step": step}, tmp_path, step, keep=10)
    _truncate(tmp_path / "checkpoint_000000004.pt")
    ck.save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan"), 0.0])},
                        "loss": {"centers": torch.zeros(2)}, "step": 3}, tmp_path, 3, keep=10)
    with caplog.at_level("WARNING", logger="facemetric.training.checkpoint"):
        path, state = ck.load_newest_checkpoint(tmp_path)
    assert path.name == "checkpoint_000000002.pt" and state["step"] == 2
    assert torch.equal(state["model"]["w"], torch.full((3,), 2.0))
    text = caplog.text
    assert "checkpoint_000000004.pt" in text and "truncated" in text
    assert "checkpoint_000000003.pt" in text and "non-finite weights (model.w)" in text
    assert ck.load_newest_checkpoint(tmp_path / "empty") is None
    for step in (1, 2):
        _truncate(tmp_path / f"checkpoint_00000000{step}.pt")
    with pytest.raises(ck.CheckpointError, match=r"no usable checkpoint in .*checkpoint_000000004"
                                                 r".*checkpoint_000000001"):
        ck.load_newest_checkpoint(tmp_path)


def test_non_finite_tensors_names_each_broken_tensor():
    state = {"model": {"a": torch.zeros(3), "b": torch.tensor([1.0, float("inf")])},
             "loss": {"n": torch.tensor(3), "c": [torch.tensor([float("nan")])]},
             "x": torch.full((5,), -1e30)}
    assert ck.non_finite_tensors(state) == ["model.b", "loss.c.0"]
    big = torch.zeros(3 << 22)  # crosses the checker's blocks
    big[-1] = float("nan")
    assert ck.non_finite_tensors({"w": big}) == ["w"]
