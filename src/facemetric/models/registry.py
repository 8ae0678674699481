"""Backbones by name: ``build_model("iresnet50", embedding_size=512)``.

A backbone registers a factory under a name with :func:`register_model`; the factory takes
``embedding_size`` and the backbone's own keyword arguments and returns an ``nn.Module``
mapping ``(B, 3, 112, 112)`` float images to ``(B, embedding_size)`` embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor, nn

ModelFactory = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator registering a backbone factory under ``name`` (lower case, unique).

    Raises:
        ValueError: empty name, or a name already taken.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    key = name.strip().lower()

    def decorate(factory: _F) -> _F:
        if key in _REGISTRY:
            raise ValueError(f"a model named {key!r} is already registered")
        _REGISTRY[key] = factory
        return factory

    return decorate


def available_models() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, embedding_size: int = 512, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name`` (case-insensitive).

    Args:
        name: one of :func:`available_models`.
        embedding_size: output dimension ``D``; the model maps ``(B, 3, 112, 112)`` to
            ``(B, D)``.
        **kwargs: the backbone's own options (e.g. ``dropout`` for IResNet).

    Raises:
        ValueError: unknown name (the message lists the choices) or a non-positive
            ``embedding_size``.
        TypeError: an option the backbone does not take.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {available_models()}")
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int):
        raise ValueError(f"embedding_size must be an int, got {embedding_size!r}")
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be positive, got {embedding_size}")
    return _REGISTRY[key](embedding_size=embedding_size, **kwargs)


INPUT_SIZE = 112
"""Side of the face crops every registered backbone takes."""


def check_face_batch(x: Tensor, size: int = INPUT_SIZE) -> None:
    """Raise ``ValueError`` unless ``x`` is a float ``(B, 3, size, size)`` batch.

    The backbones end in a layer sized for the final map of the input side they were built
    for (IResNet's fully connected layer, MobileFaceNet's global depthwise convolution: 7×7
    at 112 px), so other sizes cannot work: resize or align the faces to that side first.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"input must have shape (batch, 3, {size}, {size}), got {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0)"
        )
    if x.shape[1] != 3:
        raise ValueError(
            f"input must have 3 (RGB) channels in dim 1, got shape {tuple(x.shape)}; "
            "grey images: x.expand(-1, 3, -1, -1); channels-last: x.permute(0, 3, 1, 2)"
        )
    if x.shape[2] != size or x.shape[3] != size:
        raise ValueError(
            f"input must be {size}×{size} (aligned faces), got {x.shape[2]}×{x.shape[3]}; "
            "align with facemetric.align or resize"
        )
    if not x.is_floating_point():
        raise ValueError(f"input must be floating point, got {x.dtype}")
