"""Multi-process tests on CPU (gloo, 2 processes spawned with torch.multiprocessing):
sharded Partial FC equals the one-process softmax over the union of the sampled centres
(value and gradients), DDP training through the real ``train()`` loop equals one process on
the global batch (also with sharded Partial FC, checkpoints gathered, and an exact resume;
also for the losses with batch-statistics state, center loss and AdaCos), a NaN on one rank
stops every rank with the same error, and ``torchrun -m facemetric train`` runs end to
end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from facemetric.heads import PartialFC, shard_range
from facemetric.losses.classifier import margin_cross_entropy
from facemetric.losses.margins import ArcMargin
from facemetric.training import config_from_dict, load_checkpoint, train
from facemetric.training.checkpoint import checkpoint_path
from facemetric.training.distributed import DDPContext, init_distributed

WORLD = 2
N, D, B_LOCAL = 13, 5, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_env(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip


def _spawn(fn: Any, *args: Any) -> None:
    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


# --------------------------------------------------------------------------- (a) the head


def _global_problem() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * B_LOCAL, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, N, (WORLD * B_LOCAL,), generator=gen)
    y[0], y[-1] = 0, N - 1  # targets on both shards
    w = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return x, y, w


def _head_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    _set_env(rank, port)
    ctx = init_distributed()
    try:
        assert isinstance(ctx, DDPContext) and ctx.backend == "gloo"
        x, y, w = _global_problem()
        results = []
        for ddp_averaging in (True, False):
            pfc = PartialFC(N, D, ArcMargin(0.4), 8.0, sample_rate=0.35, rank=rank,
                            world_size=WORLD, seed=3, ddp_averaging=ddp_averaging).double()
            start, stop = shard_range(N, rank, WORLD)
            with torch.no_grad():
                pfc.weight.copy_(w[start:stop])
            xl = x[rank * B_LOCAL : (rank + 1) * B_LOCAL].clone().requires_grad_(True)
            value = pfc(xl, y[rank * B_LOCAL : (rank + 1) * B_LOCAL])
            value.backward()
            sampled = pfc.last_sampled
            with torch.no_grad():  # evaluation: every centre of every shard, no sampling
                full = pfc.eval()(xl.detach(), y[rank * B_LOCAL : (rank + 1) * B_LOCAL])
            results.append({"loss": value.detach(), "x_grad": xl.grad, "w_grad": pfc.weight.grad,
                            "sampled": sampled, "eval": full})
        torch.save(results, Path(out) / f"head_{rank}.pt")
    finally:
        ctx.destroy()


def test_sharded_partial_fc_equals_one_process(tmp_path: Path) -> None:
    _spawn(_head_worker, str(tmp_path))
    x, y, w = _global_problem()
    per_rank = [torch.load(tmp_path / f"head_{r}.pt") for r in range(WORLD)]
    for run, ddp_averaging in enumerate((True, False)):
        got = [per_rank[r][run] for r in range(WORLD)]
        union = torch.cat([g["sampled"] for g in got])
        assert torch.equal(union, union.unique()), "shards sampled overlapping classes"
        assert set(y.tolist()) <= set(union.tolist())
        assert union.numel() < N  # really sampled
        xr = x.clone().requires_grad_(True)
        wr = w.clone().requires_grad_(True)
        remapped = torch.searchsorted(union, y)
        ref = margin_cross_entropy(xr, wr[union], remapped, ArcMargin(0.4), 8.0, margin_labels=y)
        ref.backward()
        factor = WORLD if ddp_averaging else 1
        every = margin_cross_entropy(x, w, y, ArcMargin(0.4), 8.0)
        for rank, g in enumerate(got):
            assert g["eval"].item() == pytest.approx(every.item(), rel=1e-12)
            assert g["loss"].item() == pytest.approx(ref.item(), rel=1e-12)
            mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
            torch.testing.assert_close(g["x_grad"], factor * xr.grad[mine], rtol=1e-10,
                                       atol=1e-12)
            start, stop = shard_range(N, rank, WORLD)
            torch.testing.assert_close(g["w_grad"], wr.grad[start:stop], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- (b) training


class _Tensors(torch.utils.data.Dataset):
    """Ready tensors (the loop uses them as they are) with a ``targets`` attribute."""

    def __init__(self, n: int = 48, classes: int = 6) -> None:
        gen = torch.Generator().manual_seed(0)
        self.targets = [i % classes for i in range(n)]
        centres = torch.randn(classes, 3, 4, 4, generator=gen)
        self.images = centres[self.targets] + 0.5 * torch.randn(n, 3, 4, 4, generator=gen)
        self.num_classes = classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], self.targets[i]


def _model() -> nn.Module:
    torch.manual_seed(123)  # same initial backbone everywhere (no BatchNorm: sync-free)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 8))


def _config(out: Path, batch: int, steps: int, partial: float | None,
            loss: dict[str, Any] | None = None) -> Any:
    raw: dict[str, Any] = {
        "seed": 4, "output_dir": str(out),
        "data": {"root": str(out), "verify": False, "image_size": 8},
        "augment": {"flip": False},
        "model": {"name": "small_cnn", "embedding_size": 8},
        "loss": loss or {"name": "arcface", "scale": 8.0, "margin": 0.3},
        "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3},
        "schedule": {"name": "constant"},
        "batch": {"size": batch},
        "train": {"max_steps": steps, "checkpoint_every": 2, "log_every": 1, "device": "cpu"},
    }  # fmt: skip
    if partial is not None:
        raw["partial_fc"] = {"sample_rate": partial}
    return config_from_dict(raw)


def _plain_worker(rank: int, port: int, out: str) -> None:
    """Plain ArcFace: the backbone and the (replicated) centres are both DDP-wrapped."""
    torch.set_num_threads(1)
    _set_env(rank, port)
    ctx = init_distributed()
    try:
        run = train(_config(Path(out) / "plain", B_LOCAL, 4, None), dataset=_Tensors(),
                    model=_model(), context=ctx, progress=False)
        torch.save(([p.detach() for p in run.model.parameters()], run.loss.weight.detach(),
                    run.losses, None), Path(out) / f"plain_{rank}.pt")
    finally:
        ctx.destroy()


def _pfc_worker(rank: int, port: int, out: str) -> None:
    """Sharded Partial FC at rate 1 (= ArcFace): 2 steps, then resumed to 4."""
    torch.set_num_threads(1)
    _set_env(rank, port)
    ctx = init_distributed()
    try:
        cfg = _config(Path(out) / "pfc", B_LOCAL, 2, 1.0)
        train(cfg, dataset=_Tensors(), model=_model(), context=ctx, progress=False)
        cfg.train.max_steps = 4
        run = train(cfg, resume=True, dataset=_Tensors(), model=_model(), context=ctx,
                    progress=False)
        assert isinstance(run.loss, PartialFC) and run.loss.world_size == WORLD
        torch.save(([p.detach() for p in run.model.parameters()], run.loss.weight.detach(),
                    run.losses, run.resumed_from), Path(out) / f"pfc_{rank}.pt")
    finally:
        ctx.destroy()


def _reference(tmp_path: Path) -> tuple[list[Tensor], Tensor, list[float]]:
    """One process, the global batch (2 × B_LOCAL), plain ArcFace, 4 steps."""
    torch.set_num_threads(1)
    ref = train(_config(tmp_path / "ref", WORLD * B_LOCAL, 4, None), dataset=_Tensors(),
                model=_model(), progress=False)
    params = [p.detach() for p in ref.model.parameters()]
    initial = [p.detach() for p in _model().parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(params, initial, strict=True))
    return params, ref.loss.weight.detach(), ref.losses


@pytest.mark.parametrize("kind", ["plain", "pfc"])
def test_ddp_training_equals_one_process_on_the_global_batch(tmp_path: Path, kind: str) -> None:
    _spawn(_plain_worker if kind == "plain" else _pfc_worker, str(tmp_path))
    ref_params, ref_weight, ref_losses = _reference(tmp_path)
    for rank in range(WORLD):
        params, weight, losses, resumed_from = torch.load(tmp_path / f"{kind}_{rank}.pt")
        for got, want in zip(params, ref_params, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if kind == "pfc":  # this rank's shard of the centres
            assert resumed_from == 2
            start, stop = shard_range(ref_weight.shape[0], rank, WORLD)
            torch.testing.assert_close(weight, ref_weight[start:stop], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(weight, ref_weight, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    if kind == "pfc":  # rank 0 wrote checkpoints with every centre and its full momentum
        state = load_checkpoint(checkpoint_path(tmp_path / "pfc", 4), map_location="cpu")
        torch.testing.assert_close(state["loss"]["weight"], ref_weight, rtol=1e-5, atol=1e-5)
        momentum = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()
                    if s["momentum_buffer"].shape == ref_weight.shape]
        assert len(momentum) == 1


# --------------------------------------------------------------------------- stateful losses


def _gather_worker(rank: int, port: int, out: str) -> None:
    from facemetric.losses.cross_rank import gather_rows

    torch.set_num_threads(1)
    _set_env(rank, port)
    ctx = init_distributed()
    try:
        rows = 2 + 3 * rank  # unequal shards: 2 and 5 rows
        x = torch.arange(rows * 3, dtype=torch.float64).view(rows, 3) + 100 * rank
        y = torch.full((rows,), rank, dtype=torch.int64)
        torch.save(gather_rows([x, y], dist.group.WORLD), Path(out) / f"gather_{rank}.pt")
    finally:
        ctx.destroy()


def test_gather_rows_concatenates_unequal_shards_in_rank_order(tmp_path: Path) -> None:
    _spawn(_gather_worker, str(tmp_path))
    want_x = torch.cat([torch.arange(6, dtype=torch.float64).view(2, 3),
                        torch.arange(15, dtype=torch.float64).view(5, 3) + 100])
    want_y = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    for rank in range(WORLD):
        x, y = torch.load(tmp_path / f"gather_{rank}.pt")
        assert torch.equal(x, want_x) and torch.equal(y, want_y)


def _memory_worker(rank: int, port: int, out: str) -> None:
    from facemetric.losses.cross_rank import set_statistics_group
    from facemetric.losses.pair import NPairLoss
    from facemetric.losses.pair.memory import CrossBatchMemory

    torch.set_num_threads(1)
    _set_env(rank, port)
    ctx = init_distributed()
    try:
        memory = CrossBatchMemory(NPairLoss(), 3, size=10)
        assert set_statistics_group(memory, dist.group.WORLD) == [""]
        values = []
        for step in range(3):  # 4 rows per rank per step: 8 a step, the ring wraps
            x, y = _memory_shard(step, rank)
            values.append(memory(x, y).item())
        torch.save((values, memory.state_dict()), Path(out) / f"memory_{rank}.pt")
    finally:
        ctx.destroy()


def _memory_shard(step: int, rank: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(4, 3, generator=g), torch.tensor([0, 0, 1 + rank, 1 + rank])


def test_ddp_cross_batch_memories_hold_the_global_batch_on_every_rank(tmp_path: Path) -> None:
    """Each rank enqueues every rank's rows in rank order, so the memories are identical and
    each rank's loss pairs its own shard with them: the same value as one process whose
    memory was filled with the concatenated shards."""
    from facemetric.losses.pair import NPairLoss

    _spawn(_memory_worker, str(tmp_path))
    (values0, state0), (values1, state1) = (torch.load(tmp_path / f"memory_{r}.pt")
                                            for r in range(WORLD))
    for key, value in state0.items():
        assert torch.equal(value, state1[key]), key
    rows = torch.cat([_memory_shard(s, r)[0] for s in range(3) for r in range(WORLD)])
    labels = torch.cat([_memory_shard(s, r)[1] for s in range(3) for r in range(WORLD)])
    held = state0["memory"][: int(state0["filled"])]
    assert int(state0["filled"]) == 10 and int(state0["pointer"]) == 24 % 10
    assert sorted(map(tuple, held.tolist())) == sorted(map(tuple, rows[-10:].tolist()))
    assert sorted(state0["memory_labels"].tolist()) == sorted(labels[-10:].tolist())
    for rank, values in enumerate((values0, values1)):  # this rank's shard against the
        for step in range(3):  # global rows of the steps before, the last 10 of them
            x, y = _memory_shard(step, rank)
            before = slice(max(0, 8 * step - 10), 8 * step)
            want = NPairLoss()(x, y)
            if step > 0:
                want = want + NPairLoss().reference_loss(x, y, rows[before], labels[before])
            assert values[step] == pytest.approx(want.item(), rel=1e-6), (rank, step)


#: losses whose training-mode forward updates state from the batch (centres, scale)
STATEFUL = {
    "center": {"name": "center", "lam": 0.5, "alpha": 0.5},
    "adacos": {"name": "adacos"},
}
STATEFUL_STEPS = 5


def _stateful_worker(rank: int, port: int, out: str, kind: str) -> None:
    torch.set_num_threads(1)
    _set_env(rank, port)
    ctx = init_distributed()
    try:
        cfg = _config(Path(out) / kind, B_LOCAL, STATEFUL_STEPS, None, STATEFUL[kind])
        run = train(cfg, dataset=_Tensors(), model=_model(), context=ctx, progress=False)
        torch.save(([p.detach() for p in run.model.parameters()],
                    {k: v.detach().clone() for k, v in run.loss.state_dict().items()},
                    run.losses), Path(out) / f"{kind}_{rank}.pt")
    finally:
        ctx.destroy()


@pytest.mark.parametrize("kind", sorted(STATEFUL))
def test_ddp_stateful_losses_equal_one_process_on_the_global_batch(tmp_path: Path,
                                                                   kind: str) -> None:
    """Center loss's centres and AdaCos's scale are buffers updated from the batch: under
    DDP they must follow the global batch (every rank's shard), exactly as one process on
    the whole batch, and so must everything trained with them."""
    _spawn(_stateful_worker, str(tmp_path), kind)
    torch.set_num_threads(1)
    ref = train(_config(tmp_path / "ref", WORLD * B_LOCAL, STATEFUL_STEPS, None, STATEFUL[kind]),
                dataset=_Tensors(), model=_model(), progress=False)
    ref_state = {k: v.detach() for k, v in ref.loss.state_dict().items()}
    if kind == "center":  # the centres moved, differently for the different classes
        centres = ref_state["centers"]
        assert centres.abs().sum(dim=1).gt(0).sum() >= 4
    else:  # the dynamic scale left its fixed starting value sqrt(2)·ln(C − 1)
        fixed = float(np.sqrt(2.0) * np.log(_Tensors().num_classes - 1))
        assert abs(float(ref_state["current_scale"]) - fixed) > 1e-3
    ref_params = [p.detach() for p in ref.model.parameters()]
    for rank in range(WORLD):
        params, state, losses = torch.load(tmp_path / f"{kind}_{rank}.pt")
        assert state.keys() == ref_state.keys()
        for name, want in ref_state.items():
            torch.testing.assert_close(state[name], want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
        for got, want in zip(params, ref_params, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(losses, ref.losses, rtol=1e-5)


# --------------------------------------------------------------------------- agreeing to stop


class _SquaredNorm(nn.Module):
    """A parameter-free loss, NaN on ``nan_rank`` at its ``nan_call``-th call."""

    def __init__(self, rank: int, nan_rank: int, nan_call: int) -> None:
        super().__init__()
        self.rank, self.nan_rank, self.nan_call, self.calls = rank, nan_rank, nan_call, 0

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        self.calls += 1
        value = emb.pow(2).mean()
        if self.rank == self.nan_rank and self.calls == self.nan_call:
            return value * float("nan")
        return value


class _NanOnRank(nn.Module):
    """``_model()``, with NaN outputs on ``nan_rank`` at its ``nan_call``-th forward."""

    def __init__(self, rank: int, nan_rank: int, nan_call: int) -> None:
        super().__init__()
        self.net, self.calls = _model(), 0
        self.poison = rank == nan_rank
        self.nan_call = nan_call

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.poison and self.calls == self.nan_call else out


#: the process group's timeout in the failure tests: a rank left waiting in a collective
#: fails with gloo's timeout error after this long instead of our FloatingPointError
STOP_TIMEOUT_S = 60.0


def _stop_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    _set_env(rank, port)
    ctx = init_distributed(timeout_s=STOP_TIMEOUT_S)
    outcome: dict[str, Any] = {}
    try:
        cases = {
            "loss": ({"model": _model(), "loss": _SquaredNorm(rank, 1, 2)}),
            "embeddings": ({"model": _NanOnRank(rank, 0, 3)}),
        }
        for name, kwargs in cases.items():
            cfg = _config(Path(out) / name, B_LOCAL, 6, None)
            cfg.train.checkpoint_every = 100
            try:
                train(cfg, dataset=_Tensors(), context=ctx, progress=False, **kwargs)
                outcome[name] = ("finished", "")
            except Exception as err:  # what each rank saw, for the test to judge
                outcome[name] = (type(err).__name__, str(err))
    finally:
        torch.save(outcome, Path(out) / f"stop_{rank}.pt")
        ctx.destroy()


def test_non_finite_on_one_rank_stops_every_rank_with_one_message(tmp_path: Path) -> None:
    """Rank 1's loss is NaN at step 2 (rank 0's is finite); then, in a second run, rank 0's
    embeddings are NaN at step 3. Every rank must raise the same FloatingPointError at once
    — not one rank raising while the other waits in the gradient all-reduce until the
    group's timeout (which would end it with gloo's error, not ours)."""
    _spawn(_stop_worker, str(tmp_path))
    outcomes = [torch.load(tmp_path / f"stop_{r}.pt") for r in range(WORLD)]
    for rank, outcome in enumerate(outcomes):
        kind, message = outcome["loss"]
        assert kind == "FloatingPointError", (rank, kind, message)
        assert message.startswith("the loss is nan at step 2 on rank 1 of 2"), message
        kind, message = outcome["embeddings"]
        assert kind == "FloatingPointError", (rank, kind, message)
        assert message.startswith("the embeddings hold NaN or Inf at step 3 on rank 0 of 2")
    assert outcomes[0] == outcomes[1]  # one message, the same on every rank
    for name in ("loss", "embeddings"):
        assert not list((tmp_path / name).glob("checkpoint_*.pt"))


def test_init_distributed_without_torchrun_is_one_process(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size) == (0, 1) and not isinstance(ctx, DDPContext)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed()


# --------------------------------------------------------------------------- torchrun


def test_torchrun_launches_facemetric_train(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        folder = tmp_path / "faces" / f"person_{i}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, (4, 4, 3))
        for j in range(4):
            img = np.kron(base, np.ones((4, 4, 1))) + rng.normal(0, 10, (16, 16, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{j}.png")
    config = tmp_path / "run.toml"
    config.write_text(
        'seed = 0\noutput_dir = "out"\n[data]\nroot = "faces"\nimage_size = 16\n'
        '[model]\nname = "small_cnn"\nembedding_size = 8\noptions = { width = 4 }\n'
        '[loss]\nname = "cosface"\nscale = 8.0\nmargin = 0.2\n'
        '[partial_fc]\nsample_rate = 0.5\n[batch]\nsize = 4\n'
        '[train]\nmax_steps = 2\ncheckpoint_every = 1\nlog_every = 1\ndevice = "cpu"\n'
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "facemetric", "train", "--config", str(config)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    state = load_checkpoint(checkpoint_path(out, 2), map_location="cpu")
    assert state["loss"]["weight"].shape == (4, 8)  # every centre, gathered from 2 shards
    assert state["config"]["partial_fc"]["sample_rate"] == 0.5
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per step, written once (rank 0)
    assert "trained 2 steps" in proc.stdout


def test_the_glint360k_config_runs_under_torchrun_from_a_record_file(tmp_path: Path) -> None:
    """The shipped large-scale config as it stands — IResNet-100, CosFace through Partial FC
    sharded over the processes, bf16 autocast, SGD with sparse centre updates, an insightface
    ``.rec`` input — for 2 steps on 2 CPU processes (gloo), with only its data path, output
    folder, batch size and length replaced."""
    import io
    import re

    from PIL import Image

    from facemetric.data.recordio import write_record_file

    rng = np.random.default_rng(0)
    items = []
    for label in range(6):
        base = rng.integers(0, 256, (4, 4, 3))
        for _ in range(2):
            img = np.kron(base, np.ones((28, 28, 1))) + rng.normal(0, 10, (112, 112, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG")
            items.append((buf.getvalue(), label))
    rec, _ = write_record_file(items, tmp_path / "train.rec")
    shipped = (Path(__file__).resolve().parents[2] / "configs"
               / "glint360k_iresnet100_pfc.toml").read_text()
    text = shipped
    for pattern, value in ((r'root = "[^"]+"', f'root = "{rec}"'),
                           (r'output_dir = "[^"]+"', 'output_dir = "out"'),
                           (r"num_workers = \d+", "num_workers = 0"),
                           (r"size = 128", "size = 2"),
                           (r"epochs = 20", "max_steps = 2\ndevice = \"cpu\""),
                           (r"checkpoint_every = \d+", "checkpoint_every = 2"),
                           (r"log_every = \d+", "log_every = 1")):
        text, hits = re.subn(pattern, value, text)
        assert hits == 1, pattern
    config = tmp_path / "run.toml"
    config.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "facemetric", "train", "--config", str(config)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = load_checkpoint(checkpoint_path(tmp_path / "out", 2), map_location="cpu")
    assert state["config"]["model"]["name"] == "iresnet100"
    assert state["config"]["train"]["amp"] and state["config"]["train"]["amp_dtype"] == "bf16"
    assert state["config"]["partial_fc"] == {"sample_rate": 0.2, "sparse_update": True}
    assert state["loss"]["weight"].shape == (6, 512)  # both shards' centres, gathered
    assert torch.isfinite(state["loss"]["weight"]).all()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
