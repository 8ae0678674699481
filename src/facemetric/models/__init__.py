"""Backbones for 112×112 faces, built by name: ``build_model("iresnet50")``."""

from facemetric.models.dlib_resnet import DlibResNet, dlib_resnet
from facemetric.models.iresnet import (
    IResidualUnit,
    IResNet,
    iresnet18,
    iresnet34,
    iresnet50,
    iresnet100,
)
from facemetric.models.mobilefacenet import MobileFaceNet, mobilefacenet
from facemetric.models.registry import (
    INPUT_SIZE,
    available_models,
    build_model,
    check_face_batch,
    register_model,
)
from facemetric.models.small_cnn import SmallFaceCNN, small_cnn

__all__ = [
    "INPUT_SIZE",
    "DlibResNet",
    "IResNet",
    "IResidualUnit",
    "MobileFaceNet",
    "SmallFaceCNN",
    "available_models",
    "build_model",
    "check_face_batch",
    "dlib_resnet",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "mobilefacenet",
    "register_model",
    "small_cnn",
]
