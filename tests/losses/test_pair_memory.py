"""Cross-batch memory: the N-pair and contrastive losses against a memory (float64 loops
over batch × memory pairs, with scalar ops so that their gradients are references too, and
pytorch-metric-learning's NT-Xent and contrastive losses with ``ref_emb``), and the memory's
sum, FIFO, schedule, state and refusals."""

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

BATCH = [0, 0, 1, 1, 1, 2, 2, 5]  # 2 has no row in the memory
MEMORY = [1, 3, 3, 0, 4, 5, 1, 4, 0]  # identities of the batch and others


def _data(dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(BATCH), dim, generator=g, dtype=torch.float64)
    m = torch.randn(len(MEMORY), dim, generator=g, dtype=torch.float64)
    return x, torch.tensor(BATCH), m, torch.tensor(MEMORY)


def _sim(u, v, kind):
    if kind is None:
        return sum(u[k] * v[k] for k in range(len(u)))
    if kind == "cosine":
        nu = torch.sqrt(sum(u[k] ** 2 for k in range(len(u))))
        nv = torch.sqrt(sum(v[k] ** 2 for k in range(len(v))))
        return -(1 - sum(u[k] * v[k] for k in range(len(u))) / (nu * nv))
    return -torch.sqrt(sum((u[k] - v[k]) ** 2 for k in range(len(u))))


def _npair_loop(x, labels, m, memory_labels, kind):
    """ℓ(a, r) = log(1 + Σ_n exp(s_an − s_ar)): a in the batch, r a memory row of a's
    identity, n the memory rows of other identities; the mean over (a, r)."""
    total, count = 0, 0
    for a in range(len(labels)):
        for r in range(len(memory_labels)):
            if memory_labels[r] != labels[a]:
                continue
            s_ar = _sim(x[a], m[r], kind)
            inner = sum(torch.exp(_sim(x[a], m[n], kind) - s_ar)
                        for n in range(len(memory_labels)) if memory_labels[n] != labels[a])
            total, count = total + torch.log(1 + inner), count + 1
    return total / count


def _contrastive_loop(x, labels, m, memory_labels, mp, mn, squared):
    total, count = 0, 0
    for a in range(len(labels)):
        for r in range(len(memory_labels)):
            d = -_sim(x[a], m[r], "euclidean")
            h = torch.clamp(d - mp if memory_labels[r] == labels[a] else mn - d, min=0)
            total, count = total + (h * h if squared else h), count + 1
    return total / count


def _value_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value, x.grad


@pytest.mark.parametrize("kind", [None, "euclidean", "cosine"])
def test_npair_against_references_matches_the_loop(kind):
    x, y, m, my = _data()
    distance = {None: None, "euclidean": EuclideanDistance(), "cosine": CosineDistance()}[kind]
    loss = NPairLoss(l2_reg=0.3, distance=distance)  # no regulariser in the memory term
    m_leaf = m.clone().requires_grad_(True)  # a memory never gets a gradient
    got, got_grad = _value_and_grad(lambda t: loss.reference_loss(t, y, m_leaf, my), x)
    want, want_grad = _value_and_grad(lambda t: _npair_loop(t, BATCH, m, MEMORY, kind), x)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)
    assert m_leaf.grad is None


def test_npair_against_references_is_pml_ntxent_with_inner_products():
    x, y, m, my = _data(dim=6, seed=5)
    ntxent = pml_losses.NTXentLoss(temperature=1.0, distance=pml_distances.DotProductSimilarity(
                                       normalize_embeddings=False),
                                   reducer=pml_reducers.MeanReducer())
    want = ntxent(x, y, ref_emb=m, ref_labels=my)
    assert NPairLoss().reference_loss(x, y, m, my).item() == pytest.approx(want.item(), rel=1e-9)


@pytest.mark.parametrize("squared", [False, True])
def test_contrastive_against_references_matches_the_loop_and_pml(squared):
    x, y, m, my = _data(seed=1)
    loss = ContrastiveLoss(pos_margin=0.5, neg_margin=2.5, squared=squared)
    got, got_grad = _value_and_grad(lambda t: loss.reference_loss(t, y, m, my), x)
    want, want_grad = _value_and_grad(
        lambda t: _contrastive_loop(t, BATCH, m, MEMORY, 0.5, 2.5, squared), x)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)
    if not squared:  # pml's per-pair hinges against ref_emb, reduced as one mean
        pml = pml_losses.ContrastiveLoss(
            pos_margin=0.5, neg_margin=2.5,
            distance=pml_distances.LpDistance(normalize_embeddings=False),
            reducer=pml_reducers.DoNothingReducer())
        terms = pml(x, y, ref_emb=m, ref_labels=my)
        p, n = terms["pos_loss"]["losses"], terms["neg_loss"]["losses"]
        assert p.numel() + n.numel() == len(BATCH) * len(MEMORY)
        assert got.item() == pytest.approx(((p.sum() + n.sum()) / (p.numel() + n.numel())).item(),
                                           rel=1e-9)


def test_gradcheck_against_references():
    x, y, m, my = _data(dim=3, seed=2)
    for loss in (NPairLoss(l2_reg=0.1), ContrastiveLoss(pos_margin=0.3, neg_margin=4.0)):
        assert torch.autograd.gradcheck(lambda t, f=loss: f.reference_loss(t, y, m, my),
                                        (x.clone().requires_grad_(True),))


def test_no_positive_or_no_reference_gives_a_connected_zero():
    x, y, m, _ = _data()
    x.requires_grad_(True)
    others = torch.full((len(MEMORY),), 99)
    for value in (NPairLoss().reference_loss(x, y, m, others),
                  ContrastiveLoss().reference_loss(x, y, m[:0], others[:0])):
        assert value.item() == 0.0 and value.requires_grad


def _toy_batches(n: int, rows: int = 6, dim: int = 4):
    g = torch.Generator().manual_seed(4)
    for step in range(n):
        x = torch.randn(rows, dim, generator=g)
        y = torch.tensor([step % 3, step % 3, 3, 3, 4 + step, 4 + step])
        yield x, y


def test_the_memory_is_a_fifo_switched_on_at_start_step():
    """L = ℓ(batch) + λ·ℓ_R(batch; the rows enqueued before this step, the last 10), with
    ℓ_R from a plain-float loop; nothing is read or written before start_step."""
    inner = ContrastiveLoss(pos_margin=0.2, neg_margin=1.5)
    memory = CrossBatchMemory(inner, 4, size=10, start_step=2, weight=0.5)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step, (x, y) in enumerate(_toy_batches(6)):
        value = memory(x, y)
        want = inner(x, y).item()
        if step > 2:  # before start_step, and at it with an empty memory: the plain loss
            rows = torch.cat([r for r, _ in seen])[-10:]
            labels = torch.cat([lab for _, lab in seen])[-10:]
            want += 0.5 * _contrastive_hinges(x, y, rows, labels, 0.2, 1.5)
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


def _contrastive_hinges(x, y, rows, labels, mp, mn) -> float:
    """The mean hinge over every (batch, row) pair, in Python floats."""
    total = 0.0
    for a in range(len(y)):
        for r in range(len(labels)):
            d = math.dist(x[a].tolist(), rows[r].tolist())
            total += max(0.0, d - mp if int(labels[r]) == int(y[a]) else mn - d)
    return total / (len(y) * len(labels))


def test_the_gradient_after_the_enqueue_is_that_of_the_memory_before_it():
    """The step's rows are written into the ring inside the forward; the backward pass that
    follows must still see the rows the loss was computed on."""
    batches = list(_toy_batches(3))
    memory = CrossBatchMemory(NPairLoss(), 4, size=8, weight=2.0)
    memory(*batches[0])
    before_rows = memory.memory[: int(memory.filled)].clone()
    before_labels = memory.memory_labels[: int(memory.filled)].clone()
    x, y = batches[1]
    got, got_grad = _value_and_grad(lambda t: memory(t, y), x)
    want, want_grad = _value_and_grad(
        lambda t: NPairLoss()(t, y) + 2.0 * NPairLoss().reference_loss(t, y, before_rows,
                                                                       before_labels), x)
    assert not torch.equal(memory.memory[: int(memory.filled)], before_rows)  # it was written
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_grad, want_grad)


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
    (lambda: CrossBatchMemory(NPairLoss(), 4, 8, weight=0.0), "weight must be a finite"),
    (lambda: CrossBatchMemory(NPairLoss(), 4, 8, weight=math.nan), "weight must be a finite"),
])
def test_refusals(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_embeddings_of_another_width_are_refused():
    memory = CrossBatchMemory(NPairLoss(), 8, size=16)
    x, y = next(_toy_batches(1))
    with pytest.raises(ValueError, match="the embeddings have 4 dimensions, the memory holds 8"):
        memory(x, y)


@pytest.mark.parametrize("loss", [NPairLoss(), ContrastiveLoss()], ids=["npair", "contrastive"])
@pytest.mark.parametrize(("references", "reference_labels", "match"), [
    (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), "references have 5 dimensions, the "
     "embeddings 4"),
    (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), "3 rows but 2 labels"),
    (torch.zeros(3, 4), torch.zeros(3), "must be an integer tensor"),
    (torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.long), "must be a 1-D integer tensor"),
    (torch.zeros(4), torch.zeros(4, dtype=torch.long), r"must be a \(rows, dim\) tensor"),
    (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), "floating point"),
])
def test_reference_loss_refuses_mismatched_references(loss, references, reference_labels, match):
    x, y = next(_toy_batches(1))
    with pytest.raises(ValueError, match=match):
        loss.reference_loss(x, y, references, reference_labels)


def _loss_config(**loss):
    raw = {"output_dir": "out", "data": {"root": "faces"}, "model": {"embedding_size": 16},
           "loss": {"name": "npair", **loss}, "batch": {"p": 4, "k": 2}}
    return config_from_dict(raw).loss


def test_a_config_builds_the_memory():
    loss = build_loss(_loss_config(memory_size=64, memory_start_step=5, memory_weight=0.5,
                                   l2_reg=0.01), 10, 16)
    assert isinstance(loss, CrossBatchMemory) and isinstance(loss.loss, NPairLoss)
    assert (loss.size, loss.start_step, loss.weight, tuple(loss.memory.shape)) == (
        64, 5, 0.5, (64, 16))
    assert loss.loss.l2_reg == 0.01


@pytest.mark.parametrize(("loss", "match"), [
    ({"memory_start_step": 5}, "memory_start_step is set without memory_size"),
    ({"memory_weight": 2.0}, "memory_weight is set without memory_size"),
    ({"memory_size": -1}, "memory_size must be >= 0"),
    ({"memory_size": 8, "memory_weight": 0.0}, "memory_weight must be a finite number > 0"),
])
def test_config_refusals(loss, match):
    with pytest.raises(ValueError, match=match):
        _loss_config(**loss)


def test_a_classifier_loss_with_a_memory_is_refused_by_name():
    config = _loss_config(memory_size=64)
    config.name = "arcface"
    with pytest.raises(ValueError, match=r"loss 'arcface'.*memory_size.*cannot pair"):
        build_loss(config, 10, 16)
