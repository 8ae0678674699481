"""Registries from config names to objects: losses, miners, distances, models, optimizers,
schedules.

Losses, miners and distances are discovered from what ``facemetric.losses``,
``facemetric.miners`` and ``facemetric.distances`` export, so a new loss is usable from a
config as soon as it is exported. A name matches a class when they agree after lower-casing,
dropping ``_``/``-`` and the class's ``Loss``/``Miner``/``Distance`` suffix:
``"arcface"`` → ``ArcFaceLoss``, ``"multi_similarity"`` → ``MultiSimilarityLoss``,
``"batch_hard"`` → ``BatchHardMiner``. :func:`register_loss` adds a name by hand.

A loss whose constructor takes ``num_classes`` is a *classifier* loss (it owns ``.weight``,
the class centres): it receives ``num_classes`` and ``embedding_size`` and trains on
shuffled batches. Any other loss is a *pair* loss and needs P×K batches. A loss whose
constructor takes ``class_counts`` (the dynamic-margin ArcFace) receives the training set's
images per class as well: like the class count, it is a fact of the data, not a setting.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from facemetric.losses.combined import WeightedLossSum
from facemetric.losses.margins import Margin, MultiplicativeAngularMargin, NoMargin, WarmupMargin
from facemetric.losses.pair.memory import CrossBatchMemory
from facemetric.training.config import (
    AuxLossConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
)
from facemetric.training.row_sparse_sgd import RowSparseSGD

logger = logging.getLogger(__name__)

#: abstract bases that are exported but cannot be built from a config
_NOT_BUILDABLE = {"TupleLoss", "ClassifierLoss", "NormalizedClassifierLoss", "Miner", "Distance"}
#: distillation losses take the teacher's embeddings (built from [distill]); the weighted sum is
#: built from [loss] + [[aux_loss]] — neither is a [loss] name
_NOT_BUILDABLE |= {"WeightedLossSum", "EmbeddingDistillationLoss", "RKDDistanceLoss",
                   "RKDAngleLoss", "SimilarityMatrixLoss", "DistillationObjective"}


def _key(name: str, suffix: str = "") -> str:
    key = name.lower().replace("_", "").replace("-", "")
    suffix = suffix.lower()
    return key[: -len(suffix)] if suffix and key.endswith(suffix) and key != suffix else key


@dataclass(frozen=True)
class LossEntry:
    """A buildable loss: its factory and whether it is a classifier loss."""

    name: str
    factory: Callable[..., nn.Module]
    classifier: bool


_EXTRA_LOSSES: dict[str, LossEntry] = {}


def _exported(module: Any, base: type, suffix: str) -> dict[str, type]:
    found: dict[str, type] = {}
    for attr in getattr(module, "__all__", dir(module)):
        obj = getattr(module, attr, None)
        if (
            isinstance(obj, type)
            and issubclass(obj, base)
            and obj.__name__ not in _NOT_BUILDABLE
            and not inspect.isabstract(obj)
        ):
            found[_key(obj.__name__, suffix)] = obj
    return found


def _takes(factory: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def register_loss(name: str, factory: Callable[..., nn.Module], classifier: bool) -> None:
    """Make ``name`` buildable by :func:`build_loss` (overrides a discovered loss).

    A classifier ``factory`` is called as ``factory(num_classes=..., embedding_size=...,
    **params)``; a pair-loss factory as ``factory(**params)`` (plus ``miner=``/``distance=``
    when the config names them).
    """
    _EXTRA_LOSSES[_key(name, "loss")] = LossEntry(name, factory, classifier)


#: modules whose exported ``*Loss`` classes a config can name
LOSS_MODULES = ("facemetric.losses", "facemetric.losses.pair", "facemetric.losses.classifier")


def available_losses() -> dict[str, LossEntry]:
    """Every loss a config can name (normalised name → entry).

    Raises:
        ImportError: a loss module failed to import — the error itself, with its
            traceback, so that a broken module is not mistaken for an unknown loss name.
    """
    out: dict[str, LossEntry] = {}
    for name in LOSS_MODULES:
        module = importlib.import_module(name)
        for key, cls in _exported(module, nn.Module, "loss").items():
            if cls.__name__.endswith("Loss"):
                out.setdefault(key, LossEntry(cls.__name__, cls, _takes(cls, "num_classes")))
    out.update(_EXTRA_LOSSES)
    return out


def loss_entry(name: str) -> LossEntry:
    """The entry for a config's loss name; ``ValueError`` listing the choices if unknown."""
    table = available_losses()
    entry = table.get(_key(name, "loss"))
    if entry is None:
        raise ValueError(f"unknown loss {name!r}; available: {sorted(table)}")
    return entry


def available_miners() -> dict[str, type]:
    """Miner classes by normalised name (``batchhard`` for ``BatchHardMiner`` ...)."""
    import facemetric.miners as miners_pkg

    found = _exported(miners_pkg, object, "miner")
    return {k: v for k, v in found.items() if v.__name__.endswith("Miner")}


def available_distances() -> dict[str, type]:
    """Distance classes by normalised name (``cosine``, ``euclidean``, ``squaredeuclidean``)."""
    import facemetric.distances as distances_mod

    return {
        k: v
        for k, v in _exported(distances_mod, nn.Module, "distance").items()
        if v.__name__.endswith("Distance")
    }


def _call_checked(
    factory: Callable[..., Any], params: dict[str, Any], what: str, reserved: Iterable[str]
) -> Any:
    """``factory(**params)`` after checking the names against its signature."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    ):
        accepted = [n for n in signature.parameters if n not in {"self", *reserved}]
        unknown = sorted(set(params) - set(signature.parameters) - {"self"})
        if unknown:
            raise ValueError(f"{what}: unknown parameter(s) {unknown}; valid: {sorted(accepted)}")
    try:
        return factory(**params)
    except TypeError as err:
        raise ValueError(f"{what}: {err}") from err


def build_distance(name: str, embedding_size: int, params: dict[str, Any] | None = None) -> Any:
    """A distance by name; ``MahalanobisDistance`` gets ``dim=embedding_size``."""
    table = available_distances()
    cls = table.get(_key(name, "distance"))
    if cls is None:
        raise ValueError(f"unknown distance {name!r}; available: {sorted(table)}")
    params = dict(params or {})
    if _takes(cls, "dim"):
        params.setdefault("dim", embedding_size)
    return _call_checked(cls, params, f"distance {name!r}", ())


def build_miner(name: str, params: dict[str, Any] | None = None, distance: Any = None) -> Any:
    """A miner by name (``batch_hard``, ``semi_hard``, ``batch_all`` ...)."""
    table = available_miners()
    cls = table.get(_key(name, "miner"))
    if cls is None:
        raise ValueError(f"unknown miner {name!r}; available: {sorted(table)}")
    params = dict(params or {})
    if distance is not None:
        params["distance"] = distance
    return _call_checked(cls, params, f"miner {name!r}", ())


def is_classifier_loss(config: LossConfig) -> bool:
    """Whether the configured loss is a classifier loss (needs ``num_classes``)."""
    return loss_entry(config.name).classifier


def pair_loss_names(configs: Iterable[LossConfig]) -> list[str]:
    """The names of the pair losses (those that need P×K batches) among ``configs`` — a
    config's ``[loss]`` and ``[[aux_loss]]`` sections."""
    return [c.name for c in configs if not is_classifier_loss(c)]


def build_loss(
    config: LossConfig,
    num_classes: int,
    embedding_size: int,
    class_counts: torch.Tensor | None = None,
) -> nn.Module:
    """The configured loss, with its miner and distance.

    Classifier losses receive ``num_classes`` and ``embedding_size``; a loss that takes
    ``class_counts`` receives ``class_counts`` (``(num_classes,)``, the training images of
    each class, from :func:`class_counts_of`); a miner is only accepted for pair losses.
    Parameters are checked against the constructor. Without ``[loss] distance``, a loss
    class with a ``default_distance()`` (one whose margins have fixed units, e.g. the
    hierarchical triplet loss) shares that distance with its miner. ``margin_warmup_steps``
    wraps the margin (``WarmupMargin``), ``memory_size`` the whole loss
    (``CrossBatchMemory``).

    Raises:
        ValueError: unknown loss/miner/distance, unknown or invalid parameters, a miner
            given to a loss that does not take one, a memory for a loss that cannot pair
            with one (or has a miner), or a loss that needs ``class_counts``
            built without them (or with a count per class other than ``num_classes``).
    """
    entry = loss_entry(config.name)
    what = f"loss {config.name!r} ({entry.name})"
    params = dict(config.params)
    distance = None
    if config.distance is not None:
        if not _takes(entry.factory, "distance"):
            raise ValueError(f"{what} does not take a distance")
        distance = build_distance(config.distance, embedding_size)
        params["distance"] = distance
    elif config.miner is not None and callable(getattr(entry.factory, "default_distance", None)):
        # a loss with fixed units (hierarchical triplet) lends its distance to the miner
        distance = entry.factory.default_distance()  # type: ignore[attr-defined]
        params["distance"] = distance
    if config.miner is not None:
        if not _takes(entry.factory, "miner"):
            raise ValueError(f"{what} does not take a miner")
        params["miner"] = build_miner(config.miner, config.miner_params, distance)
    elif config.miner_params:
        raise ValueError(f"{what}: miner_params given without a miner")
    reserved: tuple[str, ...] = ()
    if entry.classifier:
        params["num_classes"] = num_classes
        params["embedding_size"] = embedding_size
        reserved = ("num_classes", "embedding_size")
    if _takes(entry.factory, "class_counts"):
        if class_counts is None:
            raise ValueError(
                f"{what} needs the training set's images per class (class_counts); build it "
                "through train() or compare, or pass class_counts to build_loss"
            )
        if tuple(class_counts.shape) != (num_classes,):
            raise ValueError(
                f"{what}: class_counts has shape {tuple(class_counts.shape)}, expected "
                f"({num_classes},) — one count per class"
            )
        params["class_counts"] = class_counts
        reserved = (*reserved, "class_counts")
    clash = sorted(set(config.params) & set(reserved))
    if clash:
        raise ValueError(f"{what}: {clash} are set from the data and the model, not [loss]")
    loss = _call_checked(entry.factory, params, what, reserved)
    if not isinstance(loss, nn.Module):
        raise ValueError(f"{what}: the factory returned {type(loss).__name__}, not a Module")
    if config.margin_warmup_steps:
        margin = getattr(loss, "margin", None)
        if not isinstance(margin, Margin) or isinstance(margin, NoMargin):
            raise ValueError(
                f"{what}: margin_warmup_steps needs a loss with a margin (arcface, cosface, "
                "combined_margin, subcenter_arcface ...); remove it for this loss"
            )
        if isinstance(margin, MultiplicativeAngularMargin):
            raise ValueError(
                f"{what}: SphereFace anneals its margin itself (base, gamma, power, "
                "lambda_min); remove margin_warmup_steps"
            )
        loss.margin = WarmupMargin(margin, config.margin_warmup_steps)
    if config.memory_size:
        try:
            loss = CrossBatchMemory(loss, embedding_size, config.memory_size,
                                    config.memory_start_step, config.memory_weight)
        except ValueError as err:
            raise ValueError(f"{what}: memory_size: {err}") from err
    elif config.memory_start_step or config.memory_weight != 1.0:
        raise ValueError(f"{what}: memory_start_step or memory_weight without memory_size; "
                         "set the memory's size or remove them")
    return loss


def add_aux_losses(
    loss: nn.Module,
    aux: Sequence[AuxLossConfig],
    num_classes: int,
    embedding_size: int,
    class_counts: torch.Tensor | None = None,
) -> nn.Module:
    """``loss`` alone when ``aux`` is empty, else ``1·loss + Σ w_i·aux_i``
    (:class:`~facemetric.losses.combined.WeightedLossSum`), each ``[[aux_loss]]`` built as
    :func:`build_loss` builds ``[loss]`` (a classifier term gets centres for
    ``num_classes``, a dynamic-margin term ``class_counts``)."""
    if not aux:
        return loss
    terms = [(1.0, loss)]
    for i, section in enumerate(aux, 1):
        try:
            terms.append((section.weight, build_loss(section, num_classes, embedding_size,
                                                     class_counts)))
        except ValueError as err:
            raise ValueError(f"[[aux_loss]] {i}: {err}") from err
    return WeightedLossSum(terms)


def build_partial_fc(
    loss: nn.Module,
    sample_rate: float,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    sparse_grad: bool = False,
) -> nn.Module:
    """``PartialFC.from_loss``: the built classifier loss's margin, scale and centres (this
    rank's shard when ``world_size > 1``), sampling ``sample_rate`` of the centres per step;
    ``sparse_grad`` gives the centres a sparse gradient (train with ``RowSparseSGD``).

    Raises:
        ValueError: the loss is not a normalised-centre classifier loss with a constant scale
            and one centre per class.
    """
    from facemetric.heads import PartialFC

    try:
        return PartialFC.from_loss(
            loss, sample_rate, rank=rank, world_size=world_size, seed=seed,  # type: ignore[arg-type]
            sparse_grad=sparse_grad,
        )
    except ValueError as err:
        raise ValueError(f"[partial_fc]: {err}") from err


def check_loss_config(config: LossConfig, embedding_size: int) -> None:
    """Build the loss once on a dummy problem (2 classes of one image) to validate names and
    params."""
    build_loss(config, num_classes=2, embedding_size=embedding_size,
               class_counts=torch.ones(2, dtype=torch.int64))


def class_counts_of(labels: Sequence[int] | Any, num_classes: int) -> torch.Tensor:
    """Images per class, ``(num_classes,)`` int64, from a training set's labels.

    A class without an image counts as 1: it never appears as a target, so its margin is
    never used, and the dynamic margin ``a·n^(-λ) + b`` needs ``n ≥ 1``.

    Raises:
        ValueError: a label outside ``[0, num_classes)``.
    """
    targets = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"class_counts_of: labels must lie in [0, {num_classes}), got "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    return torch.bincount(targets, minlength=num_classes).clamp_(min=1)


def build_model(config: ModelConfig) -> nn.Module:
    """The backbone: ``facemetric.models.build_model(name, embedding_size, **options)``."""
    from facemetric.models import build_model as build_backbone

    try:
        return build_backbone(config.name, config.embedding_size, **config.options)
    except TypeError as err:
        raise ValueError(
            f"model {config.name!r}: unknown parameter in [model] options ({err})"
        ) from err


def parameter_groups(
    modules: Iterable[nn.Module], weight_decay: float, decay_all: bool = False
) -> list[dict[str, Any]]:
    """Trainable parameters of ``modules`` (each once) in two groups: with weight decay
    (tensors of 2+ dims) and without (biases, norm scales), unless ``decay_all``."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if decay_all or p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(config: OptimizerConfig, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    """SGD or AdamW over the parameters of ``modules`` — the backbone *and* the loss (a
    classifier loss's ``.weight``, a learned distance).

    SGD is :class:`~facemetric.training.RowSparseSGD` when a module has ``sparse_grad`` set
    (Partial FC's sparse update); it is ``torch.optim.SGD`` on dense gradients.

    Raises:
        ValueError: nothing to optimise, an unknown name, or AdamW with sparse gradients.
    """
    modules = list(modules)
    sparse = any(getattr(m, "sparse_grad", False) for mod in modules for m in mod.modules())
    groups = parameter_groups(modules, config.weight_decay, config.decay_all)
    if not groups:
        raise ValueError("nothing to optimise: the model and loss have no trainable parameters")
    if config.name == "sgd":
        sgd = RowSparseSGD if sparse else torch.optim.SGD
        return sgd(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    if sparse:
        raise ValueError(
            f"optimizer {config.name!r} cannot take sparse gradients (Partial FC's "
            "sparse_update): use sgd, or set [partial_fc] sparse_update = false"
        )
    if config.name == "adamw":
        b1, b2 = config.betas
        return torch.optim.AdamW(groups, lr=config.lr, betas=(b1, b2))
    raise ValueError(f"unknown optimizer {config.name!r}; choose 'sgd' or 'adamw'")


class WarmupSchedule:
    """LR multiplier at step ``t`` (a callable object, so ``LambdaLR`` checkpoints it).

    ``t < W``: ``(t + 1)/W`` (linear warm-up). After: ``cosine``: ``r + (1 − r)·½(1 +
    cos(π·(t − W)/(T − W)))`` with ``r = min_lr_ratio``; ``step``: ``γ^{#milestones ≤ t}``;
    ``constant``: 1.
    """

    def __init__(self, config: ScheduleConfig, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.name = config.name
        self.warmup = int(config.warmup_steps)
        self.total = int(total_steps)
        self.min_ratio = float(config.min_lr_ratio)
        self.milestones = list(config.milestones)
        self.gamma = float(config.gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (step - self.warmup) / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.name == "step":
            return self.gamma ** sum(1 for m in self.milestones if m <= step)
        return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` with :class:`WarmupSchedule` (call ``.step()`` every step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(config, total_steps))


__all__ = [
    "LossEntry",
    "WarmupSchedule",
    "add_aux_losses",
    "available_distances",
    "available_losses",
    "available_miners",
    "build_distance",
    "build_loss",
    "build_miner",
    "build_model",
    "build_optimizer",
    "build_partial_fc",
    "build_scheduler",
    "check_loss_config",
    "is_classifier_loss",
    "loss_entry",
    "pair_loss_names",
    "parameter_groups",
    "register_loss",
]
