"""Registry: names, errors, custom registration, and the input contract of every backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facemetric.models import available_models, build_model, check_face_batch, registry
from facemetric.models import register_model as public_register_model

ALL = [
    "dlib_resnet",
    "iresnet100",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "mobilefacenet",
    "small_cnn",
]


def test_available_models_lists_every_backbone_sorted():
    assert available_models() == ALL


def test_unknown_name_raises_value_error_listing_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet50'") as info:
        build_model("resnet50")
    for name in ALL:
        assert name in str(info.value)


def test_names_are_case_insensitive():
    model = build_model("MobileFaceNet", embedding_size=16)
    assert model.embedding_size == 16


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_embedding_size_raises(size):
    with pytest.raises(ValueError, match="embedding_size"):
        build_model("mobilefacenet", embedding_size=size)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError):
        build_model("mobilefacenet", zero_init_residual=True)  # an IResNet-only option


def test_register_custom_model_and_refuse_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @public_register_model("Tiny")
    def tiny(embedding_size: int = 512, width: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 112 * 112, embedding_size))

    assert "tiny" in available_models()
    out = build_model("tiny", embedding_size=8)(torch.zeros(2, 3, 112, 112))
    assert out.shape == (2, 8)
    with pytest.raises(ValueError, match="already registered"):
        public_register_model("tiny")(tiny)
    with pytest.raises(ValueError, match="non-empty"):
        public_register_model("  ")


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((3, 112, 112), torch.float32, "batch dimension"),
        ((2, 1, 112, 112), torch.float32, "3 \\(RGB\\) channels"),
        ((2, 112, 112, 3), torch.float32, "channels"),
        ((2, 3, 96, 96), torch.float32, "112×112"),
        ((2, 3, 112, 96), torch.float32, "got 112×96"),
        ((2, 3, 112, 112), torch.uint8, "floating point"),
    ],
)
@pytest.mark.parametrize("name", ["mobilefacenet", "iresnet18"])
def test_models_refuse_wrong_inputs(name, shape, dtype, message):
    model = build_model(name, embedding_size=8).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape, dtype=dtype))


def test_check_face_batch_accepts_a_good_batch():
    check_face_batch(torch.zeros(1, 3, 112, 112))
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        check_face_batch([[0.0]])  # type: ignore[arg-type]
