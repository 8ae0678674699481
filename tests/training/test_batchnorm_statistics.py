"""BatchNorm statistics recomputed for given weights: the first layer's against a float64 NumPy
computation over every image and position whatever the batch sizes, every layer against
PyTorch's own training-mode BatchNorm over one batch of all images, dropout left out, the
model's state restored, and the refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from facemetric.training.batchnorm_statistics import batchnorm_layers, recompute_batchnorm


def _net(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2), nn.BatchNorm2d(5), nn.PReLU(5),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(5 * 3 * 3, 6), nn.BatchNorm1d(6),
    )
    for m in net.modules():  # statistics unlike the default 0/1, so a no-op cannot pass
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(7.0)
            m.num_batches_tracked.fill_(11)
    return net


def _images(n: int = 15, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * 2.0 + 0.5


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == len(x)
    return list(torch.split(x, sizes))


def conv3x3_channel_moments(x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A bias-free 3×3 convolution (padding 1, stride 1) of ``x`` ``(N, C, H, W)`` in float64
    by explicit loops over output positions; per output channel the mean and unbiased
    variance over every image and position."""
    n, _, h, w = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, weight.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = np.einsum("nchw,ochw->no", xp[:, :, i:i + 3, j:j + 3],
                                        weight.astype(np.float64))
    values = out.transpose(1, 0, 2, 3).reshape(weight.shape[0], -1)
    return values.mean(1), values.var(1, ddof=1)


def test_the_first_layer_gets_the_exact_statistics_of_its_inputs_whatever_the_batches():
    x = _images()
    mean, var = conv3x3_channel_moments(x.numpy(), _net()[0].weight.detach().numpy())
    for sizes in ([15], [5, 7, 3], [2, 2, 2, 2, 2, 2, 3]):
        model = _net()
        seen = recompute_batchnorm(model, _split(x, sizes))
        assert seen == 15
        np.testing.assert_allclose(model[1].running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model[1].running_var.numpy(), var, rtol=1e-5)


def test_one_batch_of_all_images_gives_pytorchs_own_training_mode_statistics():
    x = _images()
    model = _net(dropout=0.0)
    reference = copy.deepcopy(model)
    for _, m in batchnorm_layers(reference):
        m.momentum = 1.0  # running statistics := this batch's (unbiased variance)
    reference.train()
    with torch.no_grad():
        reference(x)
    recompute_batchnorm(model, [x])
    for (name, mine), (_, theirs) in zip(batchnorm_layers(model), batchnorm_layers(reference),
                                         strict=True):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=1e-5,
                                   atol=1e-6, msg=name)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=1e-5,
                                   atol=1e-6, msg=name)


def test_dropout_stays_off_and_the_model_is_otherwise_as_before():
    x = _images()
    plain, dropped = _net(dropout=0.0), _net(dropout=0.9)
    dropped.train()
    dropped[1].eval()  # a mixed state, restored module by module
    before = {k: v.clone() for k, v in dropped.state_dict().items()}
    flags = [m.training for m in dropped.modules()]
    recompute_batchnorm(plain, _split(x, [5, 10]))
    recompute_batchnorm(dropped, _split(x, [5, 10]))
    for (_, a), (_, b) in zip(batchnorm_layers(plain), batchnorm_layers(dropped), strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=0)
    assert [m.training for m in dropped.modules()] == flags
    after = dropped.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{i}.{s}" for i in (1, 4, 9) for s in ("running_mean", "running_var")}


def test_a_short_last_batch_counts_by_its_images_unlike_a_cumulative_average():
    x = _images(n=11)
    exact, swa = _net(), _net()
    recompute_batchnorm(exact, _split(x, [9, 2]))
    for _, m in batchnorm_layers(swa):
        m.reset_running_stats()
        m.momentum = None
    swa.train()
    with torch.no_grad():
        for batch in _split(x, [9, 2]):
            swa(batch)
    whole = _net()
    recompute_batchnorm(whole, [x])
    # the first layer's inputs do not depend on batching: exact matches one batch, the
    # per-batch average does not
    torch.testing.assert_close(exact[1].running_mean, whole[1].running_mean, rtol=1e-5,
                               atol=1e-6)
    assert not torch.allclose(swa[1].running_mean, whole[1].running_mean, rtol=1e-3, atol=1e-4)


def test_refusals_leave_the_model_unchanged():
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        recompute_batchnorm(nn.Sequential(nn.Linear(3, 2)), [torch.zeros(2, 3)])
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no image was given"):
        recompute_batchnorm(model, [])
    with pytest.raises(ValueError, match="a batch of 1 image"):
        recompute_batchnorm(model, [_images(n=1)])
    bad = _images()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        recompute_batchnorm(model, [bad])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("n", "size", "want"), [
    (130, 64, [64, 64, 2]), (128, 64, [64, 64]), (129, 64, [64, 65]), (5, 64, [5]),
    (2, 1, [2]), (3, 2, [3]),
])
def test_the_averaged_models_batches_never_end_with_a_single_image(n, size, want):
    from facemetric.training.averaging import _batches

    chunks = _batches(n, size)
    assert [len(c) for c in chunks] == want
    assert [i for c in chunks for i in c] == list(range(n))
