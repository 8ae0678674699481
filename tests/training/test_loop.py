"""Whole-loop tests on a tiny synthetic identity folder: learning, outputs, exact resume,
broken images, configuration errors."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from facemetric.losses import WeightedLossSum
from facemetric.training import (
    StepInfo,
    config_from_dict,
    latest_checkpoint,
    load_checkpoint,
    run_from_cli,
    train,
)
from facemetric.training.builders import build_model, register_loss
from facemetric.training.config import AuxLossConfig
from facemetric.training.loop import ShuffledBatchSampler

IDENTITIES, PER_ID, SIDE = 6, 4, 32


class _NormSoftmax(nn.Module):
    """Stand-in classifier loss (normalised centres, additive cosine margin), so the
    classifier path is tested whatever ``facemetric.losses`` exports today."""

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 16.0,
                 margin: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.1)
        self.scale, self.margin = scale, margin

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        cos = F.normalize(emb, dim=1) @ F.normalize(self.weight, dim=1).T
        cos = cos - self.margin * F.one_hot(labels, cos.shape[1])
        return F.cross_entropy(self.scale * cos, labels)


register_loss("test_normsoftmax", _NormSoftmax, classifier=True)


def _make_folder(root: Path, seed: int = 0) -> Path:
    """6 identities × 4 images: a coarse random colour pattern per identity plus noise."""
    rng = np.random.default_rng(seed)
    for i in range(IDENTITIES):
        folder = root / f"person_{i}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, (4, 4, 3))
        for j in range(PER_ID):
            img = np.kron(base, np.ones((SIDE // 4, SIDE // 4, 1))) + rng.normal(0, 15, (SIDE,
                                                                                      SIDE, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("faces"))


def _config(data: Path, out: Path, loss: str = "triplet", **train_overrides):
    pfc = loss == "arcface_pfc"  # ArcFace through Partial FC (sparse centre updates)
    loss = "arcface" if pfc else loss
    pair = loss not in ("test_normsoftmax", "arcface")
    raw = {
        "seed": 3,
        "output_dir": str(out),
        "data": {"root": str(data), "image_size": SIDE, "min_images": 2},
        "augment": {"flip": True, "crop_scale": [0.8, 1.0], "padding": 2,
                    "brightness": 0.2, "contrast": 0.2, "saturation": 0.2,
                    "blur_prob": 0.2, "grayscale_prob": 0.1},
        "model": {"name": "small_cnn", "embedding_size": 16, "options": {"width": 8}},
        "loss": {"name": loss, **({"miner": "batch_hard", "margin": 0.2} if pair else {})},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup_steps": 3},
        "batch": {"p": 3, "k": 4} if pair else {"size": 8},
        "train": {"max_steps": 10, "checkpoint_every": 5, "log_every": 2, "grad_clip": 5.0,
                  **train_overrides},
    }
    if pfc:
        raw["partial_fc"] = {"sample_rate": 0.5}
        raw["loss"] = {"name": "arcface", "scale": 16.0, "margin": 0.2}
    return config_from_dict(raw)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_short_run_learns_and_writes_outputs(faces, tmp_path):
    torch.set_num_threads(1)
    cfg = _config(faces, tmp_path / "run", "triplet", max_steps=40, checkpoint_every=15,
                  keep_checkpoints=2, log_every=10)
    result = train(cfg, progress=False)
    assert result.steps == 40 and len(result.losses) == 40
    first, last = np.mean(result.losses[:8]), np.mean(result.losses[-8:])
    assert last < 0.5 * first, (first, last)
    names = sorted(p.name for p in result.output_dir.glob("checkpoint_*.pt"))
    assert names == ["checkpoint_000000030.pt", "checkpoint_000000040.pt"]  # keep 2
    assert result.checkpoint == latest_checkpoint(result.output_dir)
    rows = _rows(result.log_csv)
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "images_per_s", "wall_s",
                             "loss_terms"]
    assert {r["loss_terms"] for r in rows} == {""}  # one loss: no parts
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    assert float(rows[0]["loss"]) == pytest.approx(np.mean(result.losses[:10]), rel=1e-5)
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    # 2 P×K batches per epoch (6 identities, p = 3): step 40 happens in epoch 19
    assert int(rows[-1]["epoch"]) == 19 and result.epochs == 20
    assert result.loss_plot is not None
    assert result.loss_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result.output_dir / "config.json").exists()
    assert not list(result.output_dir.glob(".tmp-*"))
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 40
    assert torch.equal(state["losses"], torch.tensor(result.losses, dtype=torch.float64))


class _KilledError(Exception):
    pass


def _kill_after(step: int):
    def hook(info: StepInfo) -> None:
        if info.step == step:
            raise _KilledError

    return hook


def _params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _dropout_model() -> nn.Module:
    """A backbone that draws from the global torch RNG at every step (dropout)."""
    from facemetric.models import SmallFaceCNN

    torch.manual_seed(11)
    return nn.Sequential(SmallFaceCNN(16, in_channels=3, width=8), nn.Dropout(0.3))


@pytest.mark.parametrize(("loss", "workers_after_resume", "dropout"), [
    ("triplet", 0, True),  # P×K batches, global RNG used by dropout
    ("test_normsoftmax", 1, False),  # shuffled batches, class centres; a worker on resume
    ("arcface_pfc", 0, False),  # Partial FC: sampled centres, sparse rows, RowSparseSGD
])
def test_resume_is_exact(faces, tmp_path, loss, workers_after_resume, dropout):
    torch.set_num_threads(1)
    n = 11

    def model() -> nn.Module | None:
        return _dropout_model() if dropout else None

    straight = train(_config(faces, tmp_path / "straight", loss, max_steps=n), model=model(),
                     progress=False)

    out = tmp_path / "killed"
    seen: list[float] = []
    with pytest.raises(_KilledError):
        # checkpoints at 5 and 10; killed at 7: steps 6–7 are lost and redone
        train(_config(faces, out, loss, max_steps=n), model=model(), progress=False,
              on_step=lambda info: (seen.append(info.loss), _kill_after(7)(info)))
    assert latest_checkpoint(out).name == "checkpoint_000000005.pt"
    assert [int(r["step"]) for r in _rows(out / "log.csv")] == [2, 4, 6]

    cfg = _config(faces, out, loss, max_steps=n)
    cfg.data.num_workers = workers_after_resume
    resumed = train(cfg, resume=True, model=model(), progress=False)
    assert resumed.resumed_from == 5
    if loss == "arcface_pfc":
        assert resumed.loss.sparse_grad  # [partial_fc] sparse_update defaults on with SGD
    assert resumed.losses == straight.losses  # bitwise, whole sequence
    assert seen == straight.losses[:7]
    for name, value in _params(straight.model).items():
        assert torch.equal(value, _params(resumed.model)[name]), name
    assert torch.equal(straight.loss.state_dict().get("weight", torch.zeros(1)),
                       resumed.loss.state_dict().get("weight", torch.zeros(1)))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, value in a["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, b["optimizer"]["state"][key][name])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == n
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # the log after resume matches the straight one (but for timing columns)
    def key(rows):
        return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in rows]

    assert key(_rows(out / "log.csv")) == key(_rows(straight.log_csv))


def test_refuses_to_overwrite_and_resume_without_checkpoint_starts_fresh(faces, tmp_path):
    torch.set_num_threads(1)
    cfg = _config(faces, tmp_path / "run", max_steps=2, checkpoint_every=1)
    first = train(cfg, resume=True, progress=False)  # nothing to resume: fresh start
    assert first.resumed_from is None and first.steps == 2
    with pytest.raises(FileExistsError, match="resume"):
        train(cfg, progress=False)
    again = train(cfg, resume=True, progress=False)  # already finished: no more steps
    assert again.steps == 2 and again.losses == first.losses


def test_broken_images_are_skipped_and_reported(faces, tmp_path, caplog):
    torch.set_num_threads(1)
    data = _make_folder(tmp_path / "faces", seed=1)
    bad = data / "person_2" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "person_4" / "8.jpg").write_bytes(b"")
    result = train(_config(data, tmp_path / "a", max_steps=3), progress=False)
    assert sorted(f.path.name for f in result.failures) == ["8.jpg", "9.png"]
    assert result.steps == 3

    # without the up-front check, a broken file met while loading is replaced and reported
    cfg = _config(data, tmp_path / "b", max_steps=6)
    cfg.data.verify = False
    with caplog.at_level(logging.WARNING, logger="facemetric.data.folders"):
        lazy = train(cfg, progress=False)
    assert {f.path.name for f in lazy.failures} <= {"8.jpg", "9.png"}
    assert lazy.failures, "six P×K epochs visit person_2 and person_4"
    assert "unreadable" in caplog.text


def test_pair_loss_needs_pk_batches(faces, tmp_path):
    cfg = _config(faces, tmp_path / "x", "triplet")
    cfg.batch.p = cfg.batch.k = None
    with pytest.raises(ValueError, match="P×K"):
        train(cfg, progress=False)


def _aux_config(data: Path, out: Path, max_steps: int = 11):
    cfg = _config(data, out, "triplet", max_steps=max_steps)
    cfg.aux_loss = [AuxLossConfig(name="arcface", weight=0.5,
                                  params={"scale": 16.0, "margin": 0.2})]
    return cfg


def test_a_pair_loss_with_an_aux_classifier_trains_and_resumes_exactly(faces, tmp_path):
    torch.set_num_threads(1)
    straight = train(_aux_config(faces, tmp_path / "straight"), progress=False)
    assert isinstance(straight.loss, WeightedLossSum)
    assert straight.loss.weights == [1.0, 0.5]
    centres = straight.loss.state_dict()["terms.1.weight"]
    assert centres.shape == (IDENTITIES, 16)
    # log.csv's loss_terms: each part's mean over the row's steps; loss = 1·triplet + 0.5·arcface
    rows = _rows(straight.log_csv)
    for row in rows:
        parts = dict(kv.split("=") for kv in row["loss_terms"].split("; "))
        assert list(parts) == ["0.TripletLoss", "1.ArcFaceLoss"]
        total = float(parts["0.TripletLoss"]) + 0.5 * float(parts["1.ArcFaceLoss"])
        assert float(row["loss"]) == pytest.approx(total, rel=1e-4)
    # the centres moved between steps 5 and 11: they are trained with the backbone
    assert not torch.equal(centres, load_checkpoint(
        straight.output_dir / "checkpoint_000000005.pt")["loss"]["terms.1.weight"])

    out = tmp_path / "killed"
    with pytest.raises(_KilledError):
        train(_aux_config(faces, out), progress=False, on_step=_kill_after(7))
    resumed = train(_aux_config(faces, out), resume=True, progress=False)
    assert resumed.resumed_from == 5
    assert resumed.losses == straight.losses
    for name, value in _params(straight.loss).items():
        assert torch.equal(value, _params(resumed.loss)[name]), name
    for name, value in _params(straight.model).items():
        assert torch.equal(value, _params(resumed.model)[name]), name


def test_a_pair_aux_loss_needs_pk_batches(faces, tmp_path):
    cfg = _config(faces, tmp_path / "x", "arcface")
    cfg.aux_loss = [AuxLossConfig(name="triplet", weight=1.0)]
    with pytest.raises(ValueError, match="the pair loss 'triplet' needs P×K batches"):
        train(cfg, progress=False)


def test_non_finite_loss_stops_with_a_clear_error(faces, tmp_path):
    class _Nan(nn.Module):
        def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
            return emb.sum() * float("nan")

    with pytest.raises(FloatingPointError, match="step 1"):
        train(_config(faces, tmp_path / "x"), loss=_Nan(), progress=False)


def test_a_nan_loss_without_a_gradient_is_the_loops_error_not_torchs(faces, tmp_path):
    # A loss built from a constant (no graph back to the weights) used to reach backward(),
    # whose RuntimeError says nothing of NaN; the loop names the value and the step instead.
    class _NanConstant(nn.Module):
        def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
            return torch.tensor(float("nan"))

    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 1"):
        train(_config(faces, tmp_path / "x"), loss=_NanConstant(), progress=False)


def test_a_loss_that_ignores_the_embeddings_is_named(faces, tmp_path):
    class _Constant(nn.Module):
        def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
            return torch.tensor(0.25)

    with pytest.raises(ValueError, match=r"at step 1 \(0.25\) does not depend on the model"):
        train(_config(faces, tmp_path / "x"), loss=_Constant(), progress=False)
    assert not list((tmp_path / "x").glob("checkpoint_*.pt"))  # nothing written


def test_fp16_amp_on_cpu_falls_back_to_float32(faces, tmp_path, caplog):
    torch.set_num_threads(1)
    cfg = _config(faces, tmp_path / "x", max_steps=2, amp=True, amp_dtype="fp16")
    with caplog.at_level(logging.WARNING):
        result = train(cfg, progress=False)
    assert "float32" in caplog.text and result.steps == 2


def test_cudnn_benchmark_is_left_alone_on_cpu(faces, tmp_path, monkeypatch):
    # [train] cudnn_benchmark sets torch.backends.cudnn.benchmark for a CUDA run only (its
    # effect on an H200 is measured in docs/benchmarks.md); a CPU run must not touch it.
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = _config(faces, tmp_path / "x", max_steps=1, cudnn_benchmark=True)
    assert cfg.train.cudnn_benchmark is True
    train(cfg, progress=False)
    assert torch.backends.cudnn.benchmark is False


def test_run_from_cli_reads_toml(faces, tmp_path):
    torch.set_num_threads(1)
    toml = tmp_path / "exp.toml"
    toml.write_text(
        f'seed = 1\noutput_dir = "out"\n[data]\nroot = "{faces.as_posix()}"\nimage_size = 32\n'
        'min_images = 2\n[model]\nname = "small_cnn"\nembedding_size = 8\n'
        '[loss]\nname = "contrastive"\nneg_margin = 0.8\n'
        '[batch]\np = 2\nk = 2\n[train]\nmax_steps = 2\nlog_every = 1\n'
    )
    result = run_from_cli(toml, resume=False)
    assert result.output_dir == tmp_path / "out"
    assert result.steps == 2 and len(_rows(result.log_csv)) == 2


def test_shuffled_batches_depend_only_on_seed_and_epoch():
    s = ShuffledBatchSampler(23, 5, seed=4)
    s.set_epoch(2)
    a = list(s)
    assert len(a) == len(s) == 4 and all(len(b) == 5 for b in a)
    assert len({i for b in a for i in b}) == 20
    s.set_epoch(3)
    assert list(s) != a
    s.set_epoch(2)
    assert list(s) == a
    shards = [list(ShuffledBatchSampler(23, 5, seed=4, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}


def test_registry_classifier_loss_trains_on_shuffled_batches(faces, tmp_path):
    torch.set_num_threads(1)
    cfg = _config(faces, tmp_path / "arc", "test_normsoftmax", max_steps=12, log_every=3)
    cfg.loss.name, cfg.loss.params = "arcface", {"scale": 16.0, "margin": 0.2}
    result = train(cfg, progress=False)
    assert type(result.loss).__name__ == "ArcFaceLoss"
    assert result.loss.weight.shape[0] == IDENTITIES
    # 24 images / batch 8 = 3 shuffled batches per epoch
    assert result.epochs == 4
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    state = load_checkpoint(result.checkpoint)
    assert torch.equal(state["loss"]["weight"], result.loss.weight.detach())


def test_augmentation_seeds_differ_across_processes():
    from facemetric.data.transforms import sample_seeds
    from facemetric.training.loop import _SeededBatches

    def seeds(rank: int, replicas: int) -> list[list[int]]:
        sampler = ShuffledBatchSampler(40, 4, seed=1, num_replicas=replicas, rank=rank)
        return [[s for _, s in batch] for batch in _SeededBatches(sampler, 7, 2, 0)]

    one = seeds(0, 1)
    assert one == [sample_seeds(7, 2, b, 4) for b in range(10)]
    r0, r1 = seeds(0, 2), seeds(1, 2)
    assert len(r0) == len(r1) == 5
    # each process's batch b is the global batch 2b + rank: its own augmentation draws
    assert r0 == one[0::2] and r1 == one[1::2]


# --------------------------------------------------------------------------- broken numbers


class _GradPoison(torch.autograd.Function):
    """The identity, whose backward pass returns NaN."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad * float("nan")


class _NanGradientAt(nn.Module):
    """A finite loss (the mean squared embedding) whose gradient is NaN at the given calls
    (1-based: call ``i`` is step ``i``)."""

    def __init__(self, calls) -> None:
        super().__init__()
        self.calls, self.count = calls, 0

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        self.count += 1
        if self.count in self.calls:
            emb = _GradPoison.apply(emb)
        return emb.pow(2).mean()


def test_a_training_step_reads_the_device_once(faces, tmp_path):
    """The loop's own checks (embeddings finite, loss finite, gradient norm finite) and a
    combined loss's parts for ``log.csv`` come back in one transfer per step: on a GPU each
    read of a device value waits for every queued kernel. Counted on the CPU by
    :class:`facemetric.host_reads.HostReads`, entered as the model's forward begins and left
    when the optimiser's step ends (the P×K sampler's host-side draws between steps are not
    the step's); the loss itself is read-free (a mean square)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from facemetric.host_reads import HostReads

    torch.set_num_threads(1)
    objective = WeightedLossSum([(1.0, _NanGradientAt(set())), (0.5, _NanGradientAt(set()))])
    cfg = _config(faces, tmp_path / "run", max_steps=5, log_every=5, ema_decay=0.9)
    model = build_model(cfg.model)
    steps: list[HostReads] = []

    def begin(module: nn.Module, args: object) -> None:
        if module.training:  # not the EMA copy's or an evaluation's forward
            steps.append(HostReads().__enter__())

    def end(optimizer: object, args: object, kwargs: object) -> None:
        steps[-1].__exit__(None, None, None)

    hooks = [model.register_forward_pre_hook(begin), register_optimizer_step_post_hook(end)]
    try:
        result = train(cfg, model=model, loss=objective, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.steps == 5 and len(steps) == 5
    assert [mode.reads for mode in steps] == [["Tensor.tolist"]] * 5
    row = _rows(result.log_csv)[-1]  # the parts still reach log.csv: 1·m + 0.5·m = 1.5·m
    parts = dict(kv.split("=") for kv in row["loss_terms"].split("; "))
    assert set(parts) == {"0._NanGradientAt", "1._NanGradientAt"}
    assert float(parts["0._NanGradientAt"]) == pytest.approx(float(parts["1._NanGradientAt"]))
    assert float(row["loss"]) == pytest.approx(1.5 * float(parts["0._NanGradientAt"]),
                                               rel=1e-5)


def test_a_loss_whose_parts_are_plain_numbers_is_logged(faces, tmp_path):
    """A loss of the caller's may keep ``last`` as Python floats, not tensors."""

    class _Parts(nn.Module):
        def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
            value = emb.pow(2).mean()
            self.last = {"half": 0.5 * float(value.detach()), "one": 1.0}
            return value

    torch.set_num_threads(1)
    result = train(_config(faces, tmp_path / "run", max_steps=2, log_every=1), loss=_Parts(),
                   progress=False)
    rows = _rows(result.log_csv)
    assert len(rows) == 2
    for row in rows:
        parts = dict(kv.split("=") for kv in row["loss_terms"].split("; "))
        assert float(parts["one"]) == 1.0
        assert float(parts["half"]) == pytest.approx(0.5 * float(row["loss"]), rel=1e-5)


def _checkpoints(out: Path) -> dict[int, dict]:
    return {int(p.stem.split("_")[1]): load_checkpoint(p) for p in out.glob("checkpoint_*.pt")}


def test_a_nan_gradient_behind_a_finite_loss_is_skipped_with_a_warning(faces, tmp_path,
                                                                        caplog):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg = _config(faces, out, max_steps=8, checkpoint_every=1, keep_checkpoints=10,
                  max_skipped_steps=2, grad_clip=None)
    with caplog.at_level(logging.WARNING, logger="facemetric.training.loop"):
        result = train(cfg, loss=_NanGradientAt({3, 5}), progress=False)
    assert result.steps == 8 and all(np.isfinite(result.losses))
    skips = [r.message for r in caplog.records if "step skipped" in r.message]
    assert len(skips) == 2
    assert "not finite (norm nan) at step 3" in skips[0] and "1 of at most 2" in skips[0]
    assert "at step 5" in skips[1] and "2 of at most 2" in skips[1]
    states = _checkpoints(out)
    assert sorted(states) == list(range(1, 9))
    for step, state in states.items():
        assert all(torch.isfinite(v).all() for v in state["model"].values()), step
        assert state["skipped_steps"] == (0 if step < 3 else 1 if step < 5 else 2)
    weights = [name for name, _ in result.model.named_parameters()]  # not BatchNorm's stats
    for skipped in (3, 5):  # no update: weights and momentum exactly those of the step before
        before, after = states[skipped - 1], states[skipped]
        for name in weights:
            assert torch.equal(before["model"][name], after["model"][name]), (skipped, name)
        for key, entry in before["optimizer"]["state"].items():
            assert torch.equal(entry["momentum_buffer"],
                               after["optimizer"]["state"][key]["momentum_buffer"])
        following = states[skipped + 1]["model"]  # ... and training goes on after it
        assert any(not torch.equal(after["model"][k], following[k]) for k in weights)
    # the schedule still advanced through the skipped steps (they count as steps)
    assert states[3]["scheduler"]["last_epoch"] == 3


def test_too_many_nan_gradients_stop_training_without_a_broken_checkpoint(faces, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg = _config(faces, out, max_steps=8, checkpoint_every=1, keep_checkpoints=10,
                  max_skipped_steps=2)  # with gradient clipping: its norm is the check
    with pytest.raises(FloatingPointError, match=r"at step 4 behind a finite loss: 3 such "
                                                 r"steps, more than \[train\] max_skipped_steps"
                                                 r" = 2; lower \[optimizer\] lr"):
        train(cfg, loss=_NanGradientAt(set(range(2, 100))), progress=False)
    states = _checkpoints(out)
    assert sorted(states) == [1, 2, 3]
    for state in states.values():
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    with pytest.raises(FloatingPointError, match=r"at step 2 .* max_skipped_steps = 0"):
        train(_config(faces, tmp_path / "zero", max_steps=3, max_skipped_steps=0),  # 0: the 1st
              loss=_NanGradientAt({2}), progress=False)
    with pytest.raises(ValueError, match="max_skipped_steps must be >= 0"):
        _config(faces, tmp_path / "x", max_skipped_steps=-1)


class _BufferGoesInf(nn.Module):
    """A stateful loss whose state (a buffer) becomes infinite at its third call while the
    loss itself stays finite — what a diverging centre update would do."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(16))
        self.count = 0

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        self.count += 1
        if self.count == 3:
            self.centre.fill_(float("inf"))
        return emb.pow(2).mean()


def test_non_finite_weights_are_never_checkpointed(faces, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg = _config(faces, out, max_steps=6, checkpoint_every=1, keep_checkpoints=10)
    with pytest.raises(FloatingPointError, match=r"not finite after step 3 \(loss.centre\); "
                                                 r"no checkpoint written .*checkpoint_000000002"
                                                 r"\.pt, is intact"):
        train(cfg, loss=_BufferGoesInf(), progress=False)
    assert sorted(_checkpoints(out)) == [1, 2]


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "nan_weights"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(faces, tmp_path, caplog, damage):
    torch.set_num_threads(1)
    straight = train(_config(faces, tmp_path / "straight", max_steps=6, checkpoint_every=2),
                     progress=False)
    out = tmp_path / "run"
    train(_config(faces, out, max_steps=4, checkpoint_every=2), progress=False)
    newest = out / "checkpoint_000000004.pt"
    if damage == "truncated":
        _corrupt(newest)
    else:  # what an older version could write: a finite loss, NaN weights
        state = load_checkpoint(newest)
        name = next(iter(state["model"]))
        state["model"][name] = torch.full_like(state["model"][name], float("nan"))
        torch.save(state, newest)
    with caplog.at_level(logging.WARNING, logger="facemetric.training.checkpoint"):
        resumed = train(_config(faces, out, max_steps=6, checkpoint_every=2), resume=True,
                        progress=False)
    assert "checkpoint_000000004.pt" in caplog.text
    assert ("truncated" if damage == "truncated" else "non-finite weights") in caplog.text
    assert resumed.resumed_from == 2
    assert resumed.losses == straight.losses  # bitwise: steps 3–4 redone from checkpoint 2
    for name, value in _params(straight.model).items():
        assert torch.equal(value, _params(resumed.model)[name]), name


def test_cli_reports_unusable_checkpoints_as_an_error_not_a_traceback(faces, tmp_path,
                                                                       capsys):
    from facemetric.cli import main

    torch.set_num_threads(1)
    toml = tmp_path / "exp.toml"
    toml.write_text(
        f'seed = 1\noutput_dir = "out"\n[data]\nroot = "{faces.as_posix()}"\nimage_size = 32\n'
        'min_images = 2\n[model]\nname = "small_cnn"\nembedding_size = 8\n'
        '[loss]\nname = "contrastive"\n[batch]\np = 2\nk = 2\n'
        '[train]\nmax_steps = 2\ncheckpoint_every = 1\nlog_every = 1\n'
    )
    assert main(["train", "--config", str(toml)]) == 0
    for path in (tmp_path / "out").glob("checkpoint_*.pt"):
        _corrupt(path)
    capsys.readouterr()
    assert main(["train", "--config", str(toml), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("facemetric train: error: no usable checkpoint in ")
    assert "checkpoint_000000002.pt cannot be read" in err and "Traceback" not in err
    assert main(["eval", "--model", str(tmp_path / "out" / "checkpoint_000000002.pt"),
                 "--pairs", "p.txt", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("facemetric eval: error: ") and "Traceback" not in err


def test_cli_reports_a_diverged_run_in_one_sentence(monkeypatch, capsys, tmp_path):
    import facemetric.training
    from facemetric.cli import main

    def diverges(path, resume=False, teacher=None):  # run_from_cli's signature
        raise FloatingPointError("the loss is nan at step 7; lower [optimizer] lr")

    monkeypatch.setattr(facemetric.training, "run_from_cli", diverges)
    assert main(["train", "--config", str(tmp_path / "x.toml")]) == 1
    assert capsys.readouterr().err == (
        "facemetric train: error: the loss is nan at step 7; lower [optimizer] lr\n")


# --------------------------------------------------------------------------- stateful losses


STATEFUL_LOSSES = {
    "center": {"lam": 0.1, "alpha": 0.5},
    "adacos": {},
    "sphereface": {"m": 2, "base": 100.0, "gamma": 0.5},
}


def _killed_and_resumed_loss_state(config, tmp_path: Path) -> nn.Module:
    """Train ``config(out)`` straight, and again killed at step 6 (after its checkpoint at 4)
    and resumed; assert the resumed run's losses, loss state and weights equal the straight
    run's bit for bit, and return the straight run's loss module."""
    straight = train(config(tmp_path / "straight"), progress=False)
    with pytest.raises(_KilledError):
        train(config(tmp_path / "killed"), progress=False, on_step=_kill_after(6))
    resumed = train(config(tmp_path / "killed"), resume=True, progress=False)
    assert resumed.resumed_from == 4
    assert resumed.losses == straight.losses
    want, got = straight.loss.state_dict(), resumed.loss.state_dict()
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(value, got[key]), key
    for key, value in _params(straight.model).items():
        assert torch.equal(value, _params(resumed.model)[key]), key
    return straight.loss


@pytest.mark.parametrize("name", sorted(STATEFUL_LOSSES))
def test_resume_restores_stateful_losses_bit_exactly(faces, tmp_path, name):
    """Center loss's centres, AdaCos's dynamic scale and SphereFace's annealing counter are
    buffers the forward updates: a run killed after its checkpoint and resumed must carry
    them on exactly, and every later step with them."""
    torch.set_num_threads(1)
    n = 9

    def config(out: Path):
        cfg = _config(faces, out, "test_normsoftmax", max_steps=n, checkpoint_every=4)
        cfg.loss.name, cfg.loss.params = name, dict(STATEFUL_LOSSES[name])
        return cfg

    want = _killed_and_resumed_loss_state(config, tmp_path).state_dict()
    # the state really is state: it moved during the run
    if name == "center":
        assert bool(want["centers"].abs().sum(dim=1).gt(0).all())
    elif name == "adacos":
        assert float(want["current_scale"]) != pytest.approx(np.sqrt(2) * np.log(IDENTITIES - 1))
    else:
        assert int(want["margin.iteration"]) == n


def test_a_cross_batch_memory_resumes_exactly(faces, tmp_path):
    """N-pair with a cross-batch memory: the queued embeddings, their labels and the ring's
    counters are loss buffers, so a run killed after its checkpoint resumes with the memory
    it had, and every later step pairs with the same rows."""
    from facemetric.losses.pair.memory import CrossBatchMemory

    torch.set_num_threads(1)
    n = 9

    def config(out: Path):
        cfg = _config(faces, out, "npair", max_steps=n, checkpoint_every=4)
        cfg.loss.miner, cfg.loss.params = None, {"l2_reg": 0.01}
        cfg.loss.memory_size, cfg.loss.memory_start_step = 30, 2
        return cfg

    loss = _killed_and_resumed_loss_state(config, tmp_path)
    assert isinstance(loss, CrossBatchMemory)
    want = loss.state_dict()
    assert want.keys() == {"memory", "memory_labels", "pointer", "filled", "iteration"}
    # 7 steps of 12 images enqueued (steps 2–8) into 30 rows: full, pointer at 84 mod 30
    assert (int(want["iteration"]), int(want["filled"]), int(want["pointer"])) == (n, 30, 24)


def test_a_caller_s_stop_checkpoints_that_step_and_resumes_exactly(faces, tmp_path,
                                                                     monkeypatch):
    """``on_step`` returning true ends the run at that step as at its last: the weights it
    returns are the ones checkpointed there (not those of an older checkpoint), and a
    resume from that checkpoint continues as if nothing had stopped."""
    torch.set_num_threads(1)
    n = 9
    straight = train(_config(faces, tmp_path / "straight", "test_normsoftmax", max_steps=n,
                             checkpoint_every=4), progress=False)
    cfg = _config(faces, tmp_path / "stopped", "test_normsoftmax", max_steps=n,
                  checkpoint_every=4)
    seen: list[int] = []
    stopped = train(cfg, progress=False,
                    on_step=lambda info: seen.append(info.step) or info.step == 6)
    assert seen == [1, 2, 3, 4, 5, 6] and stopped.steps == 6 and len(stopped.losses) == 6
    assert stopped.checkpoint is not None and stopped.checkpoint.name == "checkpoint_000000006.pt"
    state = load_checkpoint(stopped.checkpoint)
    assert state["step"] == 6
    for key, value in _params(stopped.model).items():
        assert torch.equal(state["model"][key], value), key
    # a stop on a step that already has its checkpoint writes it once
    import facemetric.training.loop as loop_module

    written: list[int] = []
    real_save = loop_module.save_checkpoint
    monkeypatch.setattr(loop_module, "save_checkpoint", lambda state, *a, **k: (
        written.append(int(state["step"])), real_save(state, *a, **k))[1])
    again = train(_config(faces, tmp_path / "on_ckpt", "test_normsoftmax", max_steps=n,
                          checkpoint_every=4), progress=False,
                  on_step=lambda info: info.step == 4)
    assert again.steps == 4 and again.checkpoint.name == "checkpoint_000000004.pt"
    assert written == [4]
    monkeypatch.undo()
    # log.csv (log_every = 4 here) gets a row for the stop step, over steps 5-6
    stop_cfg = _config(faces, tmp_path / "stop_log", "test_normsoftmax", max_steps=n,
                       checkpoint_every=4, log_every=4)
    stop_log = train(stop_cfg, progress=False, on_step=lambda info: info.step == 6)
    rows = _rows(tmp_path / "stop_log" / "log.csv")
    assert [int(r["step"]) for r in rows] == [4, 6]
    assert float(rows[1]["loss"]) == pytest.approx(np.mean(stop_log.losses[4:6]), rel=1e-5)
    assert float(rows[0]["loss"]) == pytest.approx(np.mean(stop_log.losses[0:4]), rel=1e-5)
    # ... and a resumed run's next row covers the steps after it (7-8), then 9
    resumed_log = train(stop_cfg, resume=True, progress=False)
    rows = _rows(tmp_path / "stop_log" / "log.csv")
    assert [int(r["step"]) for r in rows] == [4, 6, 8, 9]
    assert float(rows[2]["loss"]) == pytest.approx(np.mean(resumed_log.losses[6:8]), rel=1e-5)
    assert float(rows[3]["loss"]) == pytest.approx(resumed_log.losses[8], rel=1e-5)
    resumed = train(_config(faces, tmp_path / "stopped", "test_normsoftmax", max_steps=n,
                            checkpoint_every=4), resume=True, progress=False)
    assert resumed.resumed_from == 6 and resumed.steps == n
    assert resumed.losses == straight.losses
    for key, value in _params(straight.model).items():
        assert torch.equal(value, _params(resumed.model)[key]), key


# --------------------------------------------------------------------------- global mining


def test_global_mining_resumes_exactly_with_dataloader_workers(faces, tmp_path, caplog):
    """Workers draw batches ahead of the step that uses them; batches drawn before an index
    refresh must not be used after it, or a run resumed after the refresh (which draws them
    with the new table) differs from the uninterrupted one."""
    torch.set_num_threads(1)

    def config(out: Path):
        cfg = _config(faces, out, "triplet", max_steps=8, checkpoint_every=3, grad_clip=None)
        cfg.batch.p, cfg.batch.k = 3, 2
        cfg.data.num_workers = 2  # 2 workers × prefetch 2: 4 batches drawn ahead
        cfg.mining.global_index, cfg.mining.refresh_every = True, 2
        cfg.mining.neighbours, cfg.mining.backend = 2, "torch"  # one seed a batch
        return cfg

    with caplog.at_level(logging.INFO, logger="facemetric.miners.global_index"):
        straight = train(config(tmp_path / "straight"), progress=False)
    refreshes = [r.message.split(":")[0] for r in caplog.records if "refreshed" in r.message]
    assert refreshes == ["step 2", "step 4", "step 6", "step 8"]
    # 6 identities, one seed each: 6 batches an epoch, so refreshes and the checkpoint at
    # step 3 fall inside an epoch, where the workers are ahead
    assert load_checkpoint(straight.checkpoint)["steps_per_epoch"] == 6
    with pytest.raises(_KilledError):  # checkpoint at 3 holds the step-2 table; killed at 5
        train(config(tmp_path / "killed"), progress=False, on_step=_kill_after(5))
    resumed = train(config(tmp_path / "killed"), resume=True, progress=False)
    assert resumed.resumed_from == 3
    assert resumed.losses == straight.losses
    for key, value in _params(straight.model).items():
        assert torch.equal(value, _params(resumed.model)[key]), key


def test_bf16_amp_on_cpu_runs_the_backbone_in_bfloat16(faces, tmp_path):
    """``amp = true`` (bf16) on CPU: the backbone's convolutions compute in bfloat16, the
    Partial FC margin loss in float32 (``no_autocast``), the master weights and checkpoints
    stay float32, and the first steps' losses track a float32 run of the same seed."""
    from facemetric.models import build_model

    torch.set_num_threads(1)

    def run(amp: bool, out: str) -> tuple[list[float], set[torch.dtype], Path]:
        torch.manual_seed(0)
        model = build_model("small_cnn", 16, width=8)
        seen: set[torch.dtype] = set()
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        cfg = _config(faces, tmp_path / out, "arcface_pfc", max_steps=4, checkpoint_every=4,
                      amp=amp, amp_dtype="bf16")
        result = train(cfg, model=model, progress=False)
        return result.losses, seen, result.checkpoint

    losses16, dtypes16, ckpt = run(True, "bf16")
    losses32, dtypes32, _ = run(False, "fp32")
    assert torch.bfloat16 in dtypes16 and dtypes32 == {torch.float32}
    assert all(np.isfinite(losses16))
    # bfloat16 keeps 8 bits of mantissa: the same batches give losses within a few per cent
    np.testing.assert_allclose(losses16, losses32, rtol=0.05)
    state = load_checkpoint(ckpt)
    assert all(v.dtype == torch.float32 for v in state["model"].values()
               if v.is_floating_point())


class _ReadLog(torch.utils.data.Dataset):
    """Images in memory (uint8 ``(H, W, 3)``) with ``targets``; every read's label is logged."""

    def __init__(self, images: list[np.ndarray], labels: list[int]) -> None:
        self.images, self.targets = images, labels
        self.num_classes = max(labels) + 1
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        self.reads.append(self.targets[index])
        return self.images[index], self.targets[index]


class _InputLog(nn.Module):
    """``inner`` unchanged, keeping a copy of every training batch it is given."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.batches.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("min_images", [1, 2])
def test_batch_min_images_decides_whether_single_image_identities_are_drawn(tmp_path,
                                                                            min_images):
    """3 identities with 4 images and 5 with one. ``[batch] min_images = 1`` puts the 5
    singletons into batches as k augmented copies of their image (which differ); the default
    2 never reads them."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    labels = [0] * 4 + [1] * 4 + [2] * 4 + [3, 4, 5, 6, 7]
    images = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in labels]
    data = _ReadLog(images, labels)
    cfg = _config(tmp_path / "data-unused", tmp_path / "run", "triplet", max_steps=6,
                  checkpoint_every=100)
    cfg.batch.min_images = min_images
    model = _InputLog(build_model(cfg.model))
    train(cfg, dataset=data, model=model, progress=False)

    k = cfg.batch.k
    assert len(model.batches) == 6 and len(data.reads) == 6 * cfg.batch.p * k
    drawn = set(data.reads)
    if min_images == 2:
        assert drawn == {0, 1, 2}
        return
    assert drawn == set(range(8))  # 8 identities, 3 per batch: every one within 3 batches
    copies = 0
    for step, batch in enumerate(model.batches):
        for slot in range(cfg.batch.p):
            ids = data.reads[(step * cfg.batch.p + slot) * k:(step * cfg.batch.p + slot + 1) * k]
            assert len(set(ids)) == 1  # k images of one identity, laid out together
            if ids[0] >= 3:  # a singleton: k augmentations of one image, no two equal
                views = batch[slot * k:(slot + 1) * k].flatten(1)
                assert all(not torch.equal(views[i], views[j])
                           for i in range(k) for j in range(i + 1, k))
                copies += 1
    assert copies >= 5


def test_batch_min_images_1_without_augmentation_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    labels = [0] * 4 + [1] * 4 + [2] * 4 + [3]
    data = _ReadLog([rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in labels],
                    labels)
    cfg = _config(tmp_path / "data-unused", tmp_path / "run", "triplet")
    cfg.batch.min_images = 1
    cfg.augment = type(cfg.augment)(flip=False)
    with pytest.raises(ValueError, match=r"min_images = 1 .* identical: enable an \[augment\]"):
        train(cfg, dataset=data, progress=False)
    assert data.reads == []
