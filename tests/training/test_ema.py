"""The average of the weights (``[train] ema_decay``): the formula against a float64 loop,
the checkpoints hold the average as ``"model"`` (what ``load_model`` reads) and the raw
weights as ``"model_raw"``, a killed run resumes both exactly, and ``compare`` judges the
average."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from facemetric.inference import load_model, sha256_of_tensors
from facemetric.models import SmallFaceCNN
from facemetric.training import StepInfo, config_from_dict, load_checkpoint, train
from facemetric.training.ema import WeightAverage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loop import _config, _make_folder  # the loop tests' synthetic faces and config

DECAY = 0.9


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("faces"), seed=4)


def _expected(history: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The module docstring's recursion in float64, from the recorded weights alone."""
    avg = {k: v.double() for k, v in history[0].items() if v.is_floating_point()}
    for t, weights in enumerate(history[1:], start=1):
        d = min(decay, (1.0 + t) / (10.0 + t))
        for k in avg:
            avg[k] = d * avg[k] + (1.0 - d) * weights[k].double()
    return avg


def test_the_average_follows_its_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    history = [{k: v.clone() for k, v in model.state_dict().items()}]
    ema = WeightAverage(model, 0.95)
    for _ in range(30):  # any sequence of weights, as an optimiser would leave them
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 5))  # moves BatchNorm's running statistics
        history.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    want = _expected(history, 0.95)
    got = ema.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6)
    assert ema.updates == 30
    # the integer buffer is copied, not averaged
    assert int(got["1.num_batches_tracked"]) == 30
    # early steps lean on the new weights, late ones on the average
    assert ema.current_decay() == pytest.approx(32 / 41)  # t = 31: still warming up
    ema.updates = 1000
    assert ema.current_decay() == 0.95  # then the configured decay
    assert WeightAverage(model, 0.999).current_decay() == pytest.approx(2 / 11)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(nn.Linear(2, 2), decay)


def test_config_refuses_a_decay_of_one(faces, tmp_path):
    raw = _config(faces, tmp_path / "x").to_dict()
    raw["train"]["ema_decay"] = 1.0
    with pytest.raises(ValueError, match=r"ema_decay must lie in \[0, 1\)"):
        config_from_dict(raw)


def _model() -> nn.Module:
    torch.manual_seed(21)
    return SmallFaceCNN(16, in_channels=3, width=8)


def test_checkpoints_hold_the_average_and_the_raw_weights(faces, tmp_path):
    torch.set_num_threads(1)
    model = _model()
    history = [{k: v.clone() for k, v in model.state_dict().items()}]

    def record(info: StepInfo) -> None:
        history.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    cfg = _config(faces, tmp_path / "run", max_steps=10, ema_decay=DECAY)
    result = train(cfg, model=model, on_step=record, progress=False)
    state = load_checkpoint(result.checkpoint)
    want = _expected(history, DECAY)
    for k, v in want.items():
        torch.testing.assert_close(state["model"][k].double(), v, rtol=1e-5, atol=1e-6)
        assert torch.equal(state["model_raw"][k], history[-1][k])
    assert state["ema_updates"] == 10
    assert result.averaged is not None and result.averaged.updates == 10
    moved = max((state["model"][k] - state["model_raw"][k]).abs().max().item() for k in want)
    assert moved > 1e-4  # the average is not the last iterate
    # what load_model reads is the average
    encoder = load_model(result.checkpoint)
    assert encoder.contract.weights_sha256 == sha256_of_tensors(state["model"])
    assert encoder.contract.weights_sha256 != sha256_of_tensors(state["model_raw"])


class _KilledError(Exception):
    pass


def test_a_killed_run_resumes_the_average_exactly(faces, tmp_path):
    torch.set_num_threads(1)
    n = 11
    straight = train(_config(faces, tmp_path / "straight", max_steps=n, ema_decay=DECAY),
                     model=_model(), progress=False)

    def kill(info: StepInfo) -> None:
        if info.step == 7:
            raise _KilledError

    out = tmp_path / "killed"
    with pytest.raises(_KilledError):  # checkpoints at 5 and 10; killed at 7
        train(_config(faces, out, max_steps=n, ema_decay=DECAY), model=_model(),
              on_step=kill, progress=False)
    resumed = train(_config(faces, out, max_steps=n, ema_decay=DECAY), resume=True,
                    model=_model(), progress=False)
    assert resumed.resumed_from == 5 and resumed.losses == straight.losses
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for part in ("model", "model_raw"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert a["ema_updates"] == b["ema_updates"] == n


def test_resuming_across_a_change_of_ema_decay_warns(faces, tmp_path, caplog):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    train(_config(faces, out, max_steps=5, ema_decay=DECAY), model=_model(), progress=False)
    with caplog.at_level("WARNING"):
        result = train(_config(faces, out, max_steps=8), resume=True, model=_model(),
                       progress=False)
    assert "continues from the raw weights" in caplog.text
    state = load_checkpoint(result.checkpoint)
    assert "model_raw" not in state and result.averaged is None
