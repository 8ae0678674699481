"""L2-regularised logistic regression on standardised features, fitted with L-BFGS.

The objective is scikit-learn's ``LogisticRegression(C=C, class_weight="balanced")``:

    minimise   C · Σ_i w_i · log(1 + exp(−y_i (x̃_i·β + b)))  +  ½ ‖β‖²      (y_i ∈ {−1, +1})

with ``x̃ = (x − mean) / scale`` (training mean and standard deviation of each feature),
the intercept ``b`` not penalised, and ``w_i = n / (2 n_{class(i)})`` when ``balanced``
(else 1). Written here (torch, float64) so that scoring and training need no scikit-learn
and the saved model is four plain arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LogisticModel:
    """``p(attack | x) = σ(((x − mean) / scale)·coef + intercept)``."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def decision(self, features: np.ndarray) -> np.ndarray:
        """The logit of each row of ``features``: ``(n,)`` float64."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.coef.shape[0]:
            raise ValueError(f"expected (n, {self.coef.shape[0]}) features, got {x.shape}")
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def proba(self, features: np.ndarray) -> np.ndarray:
        """``σ(decision)``: ``(n,)`` float64 in ``[0, 1]``."""
        z = self.decision(features)
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "coef": self.coef,
                "intercept": np.array([self.intercept])}

    @classmethod
    def from_arrays(cls, arrays: Any) -> LogisticModel:
        coef = np.asarray(arrays["coef"], np.float64)
        mean = np.asarray(arrays["mean"], np.float64)
        scale = np.asarray(arrays["scale"], np.float64)
        if not (coef.ndim == mean.ndim == scale.ndim == 1 and
                coef.shape == mean.shape == scale.shape):
            raise ValueError(f"inconsistent logistic model arrays: coef {coef.shape}, mean "
                             f"{mean.shape}, scale {scale.shape}")
        return cls(mean, scale, coef, float(np.asarray(arrays["intercept"]).reshape(-1)[0]))


def fit_logistic(features: np.ndarray, labels: np.ndarray, C: float = 1.0,
                 balanced: bool = True, max_iter: int = 500) -> LogisticModel:
    """Fit the model of the module docstring; ``labels`` are booleans (True = attack)."""
    import torch

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {x.shape} and labels {y.shape} do not match")
    if y.all() or not y.any():
        raise ValueError("logistic regression needs both classes in the training data")
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    xt = torch.from_numpy((x - mean) / scale)
    sign = torch.from_numpy(np.where(y, 1.0, -1.0))
    n = y.shape[0]
    counts = {True: int(y.sum()), False: int((~y).sum())}
    w = np.array([n / (2.0 * counts[bool(v)]) if balanced else 1.0 for v in y])
    weights = torch.from_numpy(w)
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        margin = sign * (xt @ beta + bias)
        # scaled by 1/(C n) so the gradient tolerance means the same for every C and n
        loss = (weights * torch.nn.functional.softplus(-margin)).sum() / n + \
            0.5 * (beta @ beta) / (C * n)
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(mean, scale, beta.detach().numpy().copy(), float(bias.item()))


__all__ = ["LogisticModel", "fit_logistic"]
