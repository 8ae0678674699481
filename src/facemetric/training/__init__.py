"""Training: TOML config → data, backbone, loss → resumable loop with checkpoints and logs.

``run_from_cli(Path("configs/arcface_mobilefacenet.toml"), resume=False)`` is what
``facemetric train --config ... [--resume]`` calls; ``train(load_config(path))`` is the
same from Python, with hooks for a custom dataset, model or loss.
"""

from facemetric.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from facemetric.training.config import TrainConfig, config_from_dict, load_config
from facemetric.training.ema import WeightAverage
from facemetric.training.loop import (
    DistributedContext,
    StepInfo,
    TrainResult,
    run_from_cli,
    train,
)
from facemetric.training.row_sparse_sgd import RowSparseSGD, clip_grad_norm

__all__ = [
    "DistributedContext",
    "RowSparseSGD",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "WeightAverage",
    "clip_grad_norm",
    "config_from_dict",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "run_from_cli",
    "save_checkpoint",
    "train",
]
