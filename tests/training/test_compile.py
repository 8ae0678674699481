"""``[train] compile``: the loop calls the backbone through ``torch.compile``. The run is the
eager run up to float rounding, the graph really went through the compiler, and the
checkpoint holds the plain module's weights (no ``_orig_mod.`` prefix) that ``load_model``
reads as it reads an eager run's."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facemetric.inference import load_model
from facemetric.models import SmallFaceCNN
from facemetric.training import StepInfo, config_from_dict, load_checkpoint, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loop import _config, _make_folder  # the loop tests' synthetic faces and config

#: torch 2.13 warns about a ``torch.jit.script_method`` of its own while it compiles (raised
#: inside torch; nothing in facemetric calls torch.jit)
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("faces"), seed=5)


def _model() -> nn.Module:
    torch.manual_seed(8)
    return SmallFaceCNN(16, in_channels=3, width=8)


def test_a_compiled_run_is_the_eager_run(faces, tmp_path):
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    steps = 6
    eager = train(_config(faces, tmp_path / "eager", max_steps=steps), model=_model(),
                  progress=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = train(_config(faces, tmp_path / "compiled", max_steps=steps, compile=True),
                     model=_model(), progress=False)
    # the backbone went through Dynamo (an ignored flag would leave this at 0)
    assert counters["stats"]["unique_graphs"] >= 1
    assert len(compiled.losses) == len(eager.losses) == steps
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3, abs=1e-5)
    a = load_checkpoint(eager.checkpoint)["model"]
    b = load_checkpoint(compiled.checkpoint)["model"]
    assert list(b) == list(a)  # the plain module's keys, no "_orig_mod." prefix
    # Fused kernels round differently, and six SGD steps with momentum carry that rounding
    # into the weights by an amount that depends on the CPU (an elementwise 1e-4 tolerance
    # held on earlier machines and not on an AMD EPYC, where the largest gap was 0.73% of the
    # distance trained): each tensor of the compiled run must lie within 3% of the distance
    # training moved it from the common start, plus 1e-6 for tensors training barely moves
    # (a bias ahead of a BatchNorm).
    start = _model().state_dict()
    for key, value in a.items():
        if not value.is_floating_point():
            assert torch.equal(b[key], value), key
            continue
        moved = float((value.double() - start[key].double()).norm())
        apart = float((b[key].double() - value.double()).norm())
        assert apart <= 0.03 * moved + 1e-6, (key, apart, moved)
    # both load for inference alike and embed alike
    faces_ = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(load_model(compiled.checkpoint).embed_faces(faces_),
                               load_model(eager.checkpoint).embed_faces(faces_), atol=1e-3)


def test_compile_must_be_true_or_false(faces, tmp_path):
    raw = _config(faces, tmp_path / "x").to_dict()
    raw["train"]["compile"] = "yes"
    with pytest.raises(ValueError, match="compile"):
        config_from_dict(raw)


class _KilledError(Exception):
    pass


def test_an_eager_run_resumes_compiled_as_if_uninterrupted(faces, tmp_path, caplog):
    """Compiling changes no arithmetic worth a warning: a run checkpointed eager resumes under
    ``compile = true`` with no configuration-change warning and the uninterrupted losses."""
    torch.set_num_threads(1)
    straight = train(_config(faces, tmp_path / "straight", max_steps=8), model=_model(),
                     progress=False)
    out = tmp_path / "run"

    def kill(info: StepInfo) -> None:
        if info.step == 6:
            raise _KilledError

    with pytest.raises(_KilledError):  # checkpoint at 5, killed at 6
        train(_config(faces, out, max_steps=8), model=_model(), on_step=kill, progress=False)
    with caplog.at_level(logging.WARNING, logger="facemetric.training.loop"):
        resumed = train(_config(faces, out, max_steps=8, compile=True), resume=True,
                        model=_model(), progress=False)
    assert resumed.resumed_from == 5
    assert not [r for r in caplog.records if "differs from the checkpoint" in r.getMessage()]
    assert resumed.losses[:5] == straight.losses[:5]  # read back from the checkpoint
    assert resumed.losses[5:] == pytest.approx(straight.losses[5:], rel=1e-3, abs=1e-5)
