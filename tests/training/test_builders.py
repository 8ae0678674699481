"""Registries: losses/miners/distances by name, optimiser parameter groups, LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from facemetric.losses.pair.base import TupleLoss
from facemetric.training.builders import (
    WarmupSchedule,
    available_losses,
    build_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    parameter_groups,
    register_loss,
)
from facemetric.training.config import LossConfig, ModelConfig, OptimizerConfig, ScheduleConfig

PAIR_LOSSES = ["triplet", "contrastive", "npair", "multi_similarity", "lifted_structure"]
CLASSIFIER_LOSSES = ["softmax", "arcface", "cosface"]


def test_pair_and_classifier_losses_are_discovered_by_config_names():
    table = available_losses()
    for name in PAIR_LOSSES:
        assert not table[name.replace("_", "")].classifier, name
    for name in CLASSIFIER_LOSSES:
        assert table[name].classifier, name


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_pair_losses_build_and_run(name):
    loss = build_loss(LossConfig(name=name), num_classes=4, embedding_size=8)
    assert isinstance(loss, TupleLoss)
    emb = torch.randn(8, 8, requires_grad=True)
    value = loss(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    value.backward()
    assert torch.isfinite(value) and emb.grad is not None


def test_miner_and_loss_share_the_configured_distance():
    cfg = LossConfig(name="triplet", miner="batch_hard", distance="cosine",
                     params={"margin": 0.1})
    loss = build_loss(cfg, num_classes=4, embedding_size=8)
    assert type(loss.miner).__name__ == "BatchHardMiner"
    assert loss.miner.distance is loss.distance
    assert type(loss.distance).__name__ == "CosineDistance"
    semi = build_loss(LossConfig(name="triplet", miner="semi-hard", miner_params={"margin": 0.3}),
                      4, 8)
    assert semi.miner.margin == 0.3


@pytest.mark.parametrize("name", CLASSIFIER_LOSSES)
def test_classifier_losses_get_classes_and_embedding_size(name):
    loss = build_loss(LossConfig(name=name), num_classes=5, embedding_size=12)
    assert loss.weight.shape[-1] == 12 and loss.weight.shape[0] % 5 == 0
    value = loss(torch.randn(4, 12), torch.tensor([0, 1, 2, 4]))
    assert torch.isfinite(value)


def test_arcface_parameters_from_the_config_reach_the_loss():
    loss = build_loss(LossConfig(name="arcface", params={"scale": 32.0, "margin": 0.3}), 5, 12)
    assert loss.scale == 32.0
    with pytest.raises(ValueError, match="set from the data"):
        build_loss(LossConfig(name="arcface", params={"num_classes": 3}), 5, 12)


def test_misconfigurations_are_explained():
    with pytest.raises(ValueError, match="does not take a miner"):
        build_loss(LossConfig(name="arcface", miner="batch_hard"), 5, 8)
    with pytest.raises(ValueError, match="miner_params given without a miner"):
        build_loss(LossConfig(name="triplet", miner_params={"margin": 1.0}), 5, 8)
    with pytest.raises(ValueError, match="unknown distance 'manhattan'"):
        build_loss(LossConfig(name="triplet", distance="manhattan"), 5, 8)
    with pytest.raises(ValueError, match="margin"):
        build_loss(LossConfig(name="contrastive", params={"pos_margin": 2.0, "neg_margin": 1.0}),
                   5, 8)


def test_registered_loss_overrides_and_learned_distance_is_optimised():
    class Centres(nn.Module):
        def __init__(self, num_classes: int, embedding_size: int, scale: float = 1.0):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(num_classes, embedding_size))
            self.scale = scale

    register_loss("my_centres", Centres, classifier=True)
    loss = build_loss(LossConfig(name="my-centres", params={"scale": 2.0}), 3, 4)
    assert loss.weight.shape == (3, 4) and loss.scale == 2.0
    model = nn.Linear(4, 4)
    opt = build_optimizer(OptimizerConfig(name="sgd", weight_decay=0.1), [model, loss])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(loss.weight) in ids and id(model.weight) in ids and id(model.bias) in ids

    maha = build_loss(LossConfig(name="contrastive", distance="mahalanobis"), 3, 6)
    assert maha.distance.weight.shape == (6, 6)
    opt = build_optimizer(OptimizerConfig(name="adamw"), [nn.Linear(6, 6), maha])
    assert id(maha.distance.weight) in {id(p) for g in opt.param_groups for p in g["params"]}


def test_weight_decay_skips_biases_and_norms_unless_decay_all():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = parameter_groups([model, model], 0.5)  # a module given twice counts once
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert [len(g["params"]) for g in parameter_groups([model], 0.5, decay_all=True)] == [4]
    opt = build_optimizer(OptimizerConfig(name="adamw", lr=0.01, betas=[0.8, 0.9]), [model])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_warmup_then_cosine_and_step_schedules():
    cos = WarmupSchedule(ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1), 14)
    assert [cos(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(4) == pytest.approx(1.0)
    assert cos(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(14) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    step = WarmupSchedule(ScheduleConfig(name="step", milestones=[3, 6], gamma=0.5), 10)
    assert [step(t) for t in range(8)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert WarmupSchedule(ScheduleConfig(name="constant", warmup_steps=2), 5)(3) == 1.0


def test_scheduler_drives_the_optimizer_and_round_trips():
    model = nn.Linear(2, 2)
    opt = build_optimizer(OptimizerConfig(lr=1.0, weight_decay=0.0), [model])
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=2), 6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] < lrs[2]
    state = sched.state_dict()
    assert state["lr_lambdas"][0]["total"] == 6  # the schedule itself is checkpointed
    other = build_scheduler(build_optimizer(OptimizerConfig(lr=1.0), [nn.Linear(2, 2)]),
                            ScheduleConfig(name="step"), 99)
    other.load_state_dict(state)
    assert other.lr_lambdas[0].total == 6 and other.lr_lambdas[0].name == "cosine"


def test_model_builder_small_cnn_and_registry_errors():
    model = build_model(ModelConfig(name="small_cnn", embedding_size=10, options={"width": 4}))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        build_model(ModelConfig(name="resnet9000"))
    with pytest.raises(ValueError, match="unknown parameter"):
        build_model(ModelConfig(name="small_cnn", options={"depth": 3}))


def test_sgd_becomes_row_sparse_for_sparse_partial_fc_and_adamw_is_refused():
    from facemetric.heads import PartialFC
    from facemetric.losses.margins import ArcMargin
    from facemetric.training import RowSparseSGD

    model = nn.Linear(4, 3)
    sparse = PartialFC(10, 3, ArcMargin(0.3), 8.0, sample_rate=0.3, sparse_grad=True)
    dense = PartialFC(10, 3, ArcMargin(0.3), 8.0, sample_rate=0.3)
    assert type(build_optimizer(OptimizerConfig(name="sgd"), [model, sparse])) is RowSparseSGD
    assert type(build_optimizer(OptimizerConfig(name="sgd"), [model, dense])) is torch.optim.SGD
    assert isinstance(build_optimizer(OptimizerConfig(name="adamw"), [model, dense]),
                      torch.optim.AdamW)
    with pytest.raises(ValueError, match="cannot take sparse gradients"):
        build_optimizer(OptimizerConfig(name="adamw"), [model, sparse])


def test_an_import_error_inside_a_loss_module_surfaces_as_itself(tmp_path, monkeypatch):
    """A loss module that fails to import must raise its own error: swallowing it would
    turn every loss it defines into a misleading "unknown loss" (or a skipped test)."""
    from facemetric.training import builders
    from facemetric.training.config import load_config

    (tmp_path / "half_written_losses.py").write_text(
        "from facemetric.losses import ArcFaceLoss\n"
        "from a_dependency_that_is_not_installed import helper\n"
        "class BrandNewLoss(ArcFaceLoss):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(builders, "LOSS_MODULES", (*builders.LOSS_MODULES, "half_written_losses"))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        builders.loss_entry("brand_new")
    config = tmp_path / "exp.toml"
    config.write_text('[loss]\nname = "brand_new"\n')
    with pytest.raises(ImportError, match="a_dependency_that_is_not_installed"):
        load_config(config)
