"""Cross-batch memory: the N-pair and contrastive losses against references (float64 loops
over batch × (batch ∪ memory) pairs, with scalar ops so that their gradients are references
too), against pytorch-metric-learning's ``CrossBatchMemory``, and the memory's FIFO,
schedule, state and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers

from facemetric.distances import CosineDistance, EuclideanDistance
from facemetric.losses.pair import ContrastiveLoss, NPairLoss, TripletLoss
from facemetric.losses.pair.memory import CrossBatchMemory
from facemetric.miners.batch_hard import BatchHardMiner
from facemetric.training.builders import build_loss
from facemetric.training.config import config_from_dict

BATCH = [0, 0, 1, 1, 1, 2, 2, 5]  # 5 has no partner in the batch, but one in the memory
MEMORY = [1, 3, 3, 0, 4, 5, 2, 4, 0]  # identities of the batch and others


def _data(dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(BATCH), dim, generator=g, dtype=torch.float64)
    m = torch.randn(len(MEMORY), dim, generator=g, dtype=torch.float64)
    return x, torch.tensor(BATCH), m, torch.tensor(MEMORY)


def _columns(x, m):
    """Every column as (vector, label, index in the batch or None)."""
    return ([(x[j], BATCH[j], j) for j in range(len(BATCH))]
            + [(m[j], MEMORY[j], None) for j in range(len(MEMORY))])


def _sim(u, v, kind):
    if kind is None:
        return sum(u[k] * v[k] for k in range(len(u)))
    if kind == "cosine":
        nu = torch.sqrt(sum(u[k] ** 2 for k in range(len(u))))
        nv = torch.sqrt(sum(v[k] ** 2 for k in range(len(v))))
        return -(1 - sum(u[k] * v[k] for k in range(len(u))) / (nu * nv))
    return -torch.sqrt(sum((u[k] - v[k]) ** 2 for k in range(len(u))))


def _npair_loop(x, m, l2_reg, kind):
    """ℓ(a, p) = log(1 + Σ_n exp(s_an − s_ap)) over a ∈ batch, p ∈ batch ∪ memory of a's
    identity (p ≠ a); n: batch samples of another identity with a batch partner, and every
    memory row of another identity."""
    partnered = {j for j in range(len(BATCH)) if BATCH.count(BATCH[j]) > 1}
    cols = _columns(x, m)
    total, count, used = 0, 0, set()
    for a in range(len(BATCH)):
        for v, label, j in cols:
            if label != BATCH[a] or j == a:
                continue
            s_ap = _sim(x[a], v, kind)
            inner = 0
            for w, other, i in cols:
                if other != BATCH[a] and (i is None or i in partnered):
                    inner = inner + torch.exp(_sim(x[a], w, kind) - s_ap)
            total, count = total + torch.log(1 + inner), count + 1
            used.add(a)
    reg = sum(sum(x[i, k] ** 2 for k in range(x.shape[1])) for i in used) / len(used)
    return total / count + l2_reg * reg


def _contrastive_loop(x, m, mp, mn, squared):
    total, count = 0, 0
    for a in range(len(BATCH)):
        for v, label, j in _columns(x, m):
            if j == a:
                continue
            d = -_sim(x[a], v, "euclidean")
            h = torch.clamp(d - mp if label == BATCH[a] else mn - d, min=0)
            total, count = total + (h * h if squared else h), count + 1
    return total / count


def _value_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value, x.grad


@pytest.mark.parametrize("kind", [None, "euclidean", "cosine"])
def test_npair_with_references_matches_the_loop(kind):
    x, y, m, my = _data()
    distance = {None: None, "euclidean": EuclideanDistance(), "cosine": CosineDistance()}[kind]
    loss = NPairLoss(l2_reg=0.3, distance=distance)
    m_leaf = m.clone().requires_grad_(True)  # a memory never gets a gradient
    got, got_grad = _value_and_grad(lambda t: loss.reference_loss(t, y, m_leaf, my), x)
    want, want_grad = _value_and_grad(lambda t: _npair_loop(t, m, 0.3, kind), x)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)
    assert m_leaf.grad is None


def test_npair_with_no_references_is_the_plain_loss():
    x, y, _, _ = _data()
    loss = NPairLoss(l2_reg=0.3)
    empty = torch.zeros(0, x.shape[1], dtype=x.dtype)
    got, got_grad = _value_and_grad(
        lambda t: loss.reference_loss(t, y, empty, torch.zeros(0, dtype=torch.int64)), x)
    want, want_grad = _value_and_grad(lambda t: loss(t, y), x)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("squared", [False, True])
def test_contrastive_with_references_matches_the_loop(squared):
    x, y, m, my = _data(seed=1)
    loss = ContrastiveLoss(pos_margin=0.5, neg_margin=2.5, squared=squared)
    got, got_grad = _value_and_grad(lambda t: loss.reference_loss(t, y, m, my), x)
    want, want_grad = _value_and_grad(lambda t: _contrastive_loop(t, m, 0.5, 2.5, squared), x)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)


def test_gradcheck_through_the_references():
    x, y, m, my = _data(dim=3, seed=2)
    for loss in (NPairLoss(l2_reg=0.1), ContrastiveLoss(pos_margin=0.3, neg_margin=4.0)):
        assert torch.autograd.gradcheck(lambda t, f=loss: f.reference_loss(t, y, m, my),
                                        (x.clone().requires_grad_(True),))


def test_a_memory_run_matches_pml_cross_batch_memory():
    """Three batches through our memory of 10 rows and through pml's of 10 + 8 (pml's queue
    holds the current batch too): the same pairs and per-pair hinges at every step."""
    g = torch.Generator().manual_seed(3)
    ours = CrossBatchMemory(ContrastiveLoss(pos_margin=0.4, neg_margin=2.0), 6, size=10)
    pml = pml_losses.CrossBatchMemory(
        pml_losses.ContrastiveLoss(pos_margin=0.4, neg_margin=2.0,
                                   distance=pml_distances.LpDistance(normalize_embeddings=False),
                                   reducer=pml_reducers.DoNothingReducer()),
        embedding_size=6, memory_size=18)
    for step in range(4):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (8,), generator=g)
        y[:2] = step  # a positive pair in every batch
        value = ours(x.float(), y)
        terms = pml(x.float(), y)
        p, n = terms["pos_loss"]["losses"], terms["neg_loss"]["losses"]
        p = p if p.dim() else p.new_zeros(0)  # pml's "no pairs" is a 0-d zero
        n = n if n.dim() else n.new_zeros(0)
        want = (p.sum() + n.sum()) / (p.numel() + n.numel())
        assert p.numel() + n.numel() == 8 * (8 - 1 + min(10, 8 * step))
        assert value.item() == pytest.approx(want.item(), rel=1e-5), step


def _toy_batches(n: int, rows: int = 6, dim: int = 4):
    g = torch.Generator().manual_seed(4)
    for step in range(n):
        x = torch.randn(rows, dim, generator=g)
        y = torch.tensor([step % 3, step % 3, 3, 3, 4 + step, 4 + step])
        yield x, y


def test_the_memory_is_a_fifo_switched_on_at_start_step():
    inner = ContrastiveLoss(pos_margin=0.2, neg_margin=1.5)
    memory = CrossBatchMemory(inner, 4, size=10, start_step=2)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step, (x, y) in enumerate(_toy_batches(6)):
        value = memory(x, y)
        if step <= 2:  # before start_step, and at it with an empty memory: the plain loss
            assert value.item() == pytest.approx(inner(x, y).item(), rel=1e-6)
        else:
            rows = torch.cat([r for r, _ in seen])[-10:]
            labels = torch.cat([lab for _, lab in seen])[-10:]
            want = _contrastive_loop_on(x, y, rows, labels, 0.2, 1.5)
            assert value.item() == pytest.approx(want, rel=1e-5), step
        if step >= 2:
            seen.append((x, y))
        assert int(memory.iteration) == step + 1
        assert int(memory.filled) == min(10, 6 * max(0, step - 1))
    # the ring holds exactly the last 10 rows enqueued, whatever their position
    last = torch.cat([r for r, _ in seen])[-10:]
    held = memory.memory[: int(memory.filled)]
    assert sorted(map(tuple, held.tolist())) == sorted(map(tuple, last.tolist()))
    assert int(memory.pointer) == (6 * 4) % 10


def _contrastive_loop_on(x, y, rows, labels, mp, mn) -> float:
    cols = [(x[j], int(y[j]), j) for j in range(len(y))] + [
        (rows[j], int(labels[j]), None) for j in range(len(labels))]
    total, count = 0.0, 0
    for a in range(len(y)):
        for v, label, j in cols:
            if j == a:
                continue
            d = math.dist(x[a].tolist(), v.tolist())
            total += max(0.0, d - mp if label == int(y[a]) else mn - d)
            count += 1
    return total / count


def test_evaluation_mode_reads_the_memory_and_changes_nothing():
    memory = CrossBatchMemory(NPairLoss(), 4, size=8)
    batches = list(_toy_batches(3))
    memory(*batches[0])
    state = {k: v.clone() for k, v in memory.state_dict().items()}
    memory.eval()
    with_memory = memory(*batches[1])
    plain = NPairLoss()(*batches[1])
    assert with_memory.item() != pytest.approx(plain.item(), rel=1e-3)  # it reads the rows
    for key, value in memory.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_the_state_dict_carries_the_memory_exactly():
    batches = list(_toy_batches(5))
    a = CrossBatchMemory(NPairLoss(), 4, size=7, start_step=1)
    for x, y in batches[:3]:
        a(x, y)
    b = CrossBatchMemory(NPairLoss(), 4, size=7, start_step=1)
    b.load_state_dict(a.state_dict())
    for x, y in batches[3:]:
        assert a(x, y).item() == b(x, y).item()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_a_batch_larger_than_the_memory_keeps_its_last_rows():
    memory = CrossBatchMemory(NPairLoss(), 4, size=4)
    x, y = next(_toy_batches(1))
    memory(x, y)
    assert torch.equal(memory.memory, x[-4:]) and torch.equal(memory.memory_labels, y[-4:])
    assert int(memory.filled) == 4 and int(memory.pointer) == 0


@pytest.mark.parametrize(("build", "match"), [
    (lambda: CrossBatchMemory(TripletLoss(), 4, 8), "TripletLoss cannot pair its batch"),
    (lambda: CrossBatchMemory(NPairLoss(miner=BatchHardMiner()), 4, 8), "has a miner"),
    (lambda: CrossBatchMemory(NPairLoss(), 4, 0), "size must be an integer >= 1"),
    (lambda: CrossBatchMemory(NPairLoss(), 4, 8, start_step=-1), "start_step must be"),
    (lambda: CrossBatchMemory(NPairLoss(), 4, True), "size must be an integer"),
])
def test_refusals(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_embeddings_of_another_width_are_refused():
    memory = CrossBatchMemory(NPairLoss(), 8, size=16)
    x, y = next(_toy_batches(1))
    with pytest.raises(ValueError, match="the embeddings have 4 dimensions, the memory holds 8"):
        memory(x, y)


def _loss_config(**loss):
    raw = {"output_dir": "out", "data": {"root": "faces"}, "model": {"embedding_size": 16},
           "loss": {"name": "npair", **loss}, "batch": {"p": 4, "k": 2}}
    return config_from_dict(raw).loss


def test_a_config_builds_the_memory():
    loss = build_loss(_loss_config(memory_size=64, memory_start_step=5, l2_reg=0.01), 10, 16)
    assert isinstance(loss, CrossBatchMemory) and isinstance(loss.loss, NPairLoss)
    assert (loss.size, loss.start_step, tuple(loss.memory.shape)) == (64, 5, (64, 16))
    assert loss.loss.l2_reg == 0.01


@pytest.mark.parametrize(("loss", "match"), [
    ({"memory_start_step": 5}, "memory_start_step is set without memory_size"),
    ({"memory_size": -1}, "memory_size must be >= 0"),
])
def test_config_refusals(loss, match):
    with pytest.raises(ValueError, match=match):
        _loss_config(**loss)


def test_a_classifier_loss_with_a_memory_is_refused_by_name():
    config = _loss_config(memory_size=64)
    config.name = "arcface"
    with pytest.raises(ValueError, match=r"loss 'arcface'.*memory_size.*cannot pair"):
        build_loss(config, 10, 16)
