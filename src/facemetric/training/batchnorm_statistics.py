"""BatchNorm's running statistics recomputed for a given set of weights (SWA's last step).

Averaged weights (:mod:`facemetric.training.averaging`) come with the average of the
checkpoints' running statistics, which are not the statistics of the averaged network's own
activations. Izmailov et al. ("Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018) recompute them with one pass over the training data; so does
:func:`recompute_batchnorm`, for every ``BatchNorm1d/2d/3d`` that tracks running statistics:

    μ_c = (1/N) Σ_i x_ic,        σ²_c = 1/(N − 1) Σ_i (x_ic − μ_c)²

over all ``N`` values of channel ``c`` that reach the layer during the pass (every image, and
every spatial position for 2-d/3-d layers): each batch's mean and variance as BatchNorm
itself computes them in training mode (read back through momentum 1, so the pass costs one
training-mode forward), merged across batches in float64 with Chan et al.'s pairwise update,
so the result is that of one pass over all images whatever the batch sizes. ``σ²`` is
unbiased, as the running variance PyTorch keeps. During the pass each BatchNorm runs in
training mode — it normalises with the batch's statistics, as in training — and every other
module (dropout among them) in evaluation mode.
This differs from ``torch.optim.swa_utils.update_bn``, whose cumulative average over batches
weights a short last batch like a full one and, averaging per-batch variances, leaves out the
spread of the batch means; here neither happens.

Afterwards the model's training flags and ``num_batches_tracked`` are as before; only the
running means and variances changed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _Moments:
    """Count, mean and sum of squared deviations per channel, merged in float64 (Chan, Golub
    and LeVeque 1979)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, n: int, mean: Tensor, m2: Tensor) -> None:
        """Merge one batch's ``n`` values per channel, their mean and squared deviations."""
        if n == 0:
            return
        mean, m2 = mean.to(torch.float64, copy=True), m2.to(torch.float64, copy=True)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers of ``model`` that keep running statistics, with their names."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


def recompute_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Set the running statistics of every BatchNorm of ``model`` to those of its inputs over
    ``batches`` (module docstring); returns the number of images seen.

    Args:
        model: the network, on the device the batches are moved to.
        batches: input tensors ``(b, ...)`` as the model takes them (already normalised).

    Raises:
        ValueError: the model has no BatchNorm with running statistics; no image; a layer
            saw a single value per channel (no variance); non-finite statistics (a diverged
            model or bad input) — the model is then left unchanged.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running "
                         "statistics: there is nothing to recompute")
    device = next(iter(model.parameters()), layers[0][1].running_mean).device
    flags = {m: m.training for m in model.modules()}
    tracked = {m: None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
               for _, m in layers}
    saved = {m: (m.running_mean.clone(), m.running_var.clone()) for _, m in layers}
    momenta = {m: m.momentum for _, m in layers}
    moments = {m: _Moments() for _, m in layers}

    def read_batch(module: nn.Module, args: tuple[Tensor, ...], _: Tensor) -> None:
        # momentum 1: BatchNorm has just set its running statistics to this batch's own
        # (unbiased variance), so they are read instead of computed a second time
        assert isinstance(module, _BatchNorm)
        n = args[0].numel() // args[0].shape[1]
        moments[module].add(n, module.running_mean, module.running_var * (n - 1))

    hooks = [m.register_forward_hook(read_batch) for _, m in layers]
    images = 0
    try:
        model.eval()
        for _, m in layers:
            m.train()
            m.momentum = 1.0
        with torch.no_grad():
            for batch in batches:
                try:
                    model(batch.to(device))
                except ValueError as err:  # BatchNorm1d in training mode, one value per channel
                    raise ValueError(f"a batch of {batch.shape[0]} image(s) could not pass "
                                     f"BatchNorm in training mode ({err}); give batches of at "
                                     "least two images") from err
                images += int(batch.shape[0])
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in flags.items():
            m.train(training)
        for m, count in tracked.items():
            if count is not None:
                m.num_batches_tracked.copy_(count)
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, (mean, var) in saved.items():  # the forward passes moved them; put them back
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    if images == 0:
        raise ValueError("no image was given: recomputing BatchNorm statistics needs the "
                         "training images (or a sample of them)")
    new: dict[_BatchNorm, tuple[Tensor, Tensor]] = {}
    for name, m in layers:
        acc = moments[m]
        if acc.mean is None or acc.m2 is None or acc.count < 2:
            raise ValueError(f"BatchNorm {name!r} saw {acc.count} value(s) per channel: "
                             "give more images")
        var = acc.m2 / (acc.count - 1)
        if not (bool(torch.isfinite(acc.mean).all()) and bool(torch.isfinite(var).all())):
            raise ValueError(f"BatchNorm {name!r}: its inputs' statistics are not finite (a "
                             "diverged model or broken images); the model was left unchanged")
        new[m] = (acc.mean, var)
    for m, (mean, var) in new.items():
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return images


__all__ = ["batchnorm_layers", "recompute_batchnorm"]
