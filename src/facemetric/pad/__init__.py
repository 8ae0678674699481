"""Presentation-attack detection (PAD, "liveness"): is the face in front of the camera a
live person or an attack — a printed photo, a screen, a mask?

- :mod:`~facemetric.pad.base`: the interface (:class:`PadDetector`: ``score(crops)`` →
  attack probability per face, ``threshold``, ``is_attack``), its input contract
  (:class:`PadInput`: the face's context crop, as the recognizer cuts it) and the saved
  format (:func:`load_detector`; JSON + ``.npz`` / weights-only torch state dict);
- :mod:`~facemetric.pad.lbp`: multi-scale uniform LBP histograms + logistic regression
  (Määttä, Hadid, Pietikäinen, IJCB 2011);
- :mod:`~facemetric.pad.cnn`: a small CNN on the face with its context;
- :mod:`~facemetric.pad.data`: a ``live/<subject>`` + ``spoof/<subject>`` folder (NUAA) →
  context crops;
- :mod:`~facemetric.pad.evaluate`: leave-subjects-out cross-validation, speed per face.

The metrics (APCER, BPCER, ACER, BPCER@APCER, DET) are in
:mod:`facemetric.evaluation.pad`. ``Recognizer(..., liveness=detector)`` refuses attacks
with ``Problem.PRESENTATION_ATTACK``.
"""

from facemetric.pad.base import PadDetector, PadInput, load_detector
from facemetric.pad.cnn import CnnConfig, CnnDetector, train_cnn
from facemetric.pad.data import PadFaces, crop_faces, load_pad_faces, scan_pad_folder
from facemetric.pad.evaluate import (
    DETECTOR_KINDS,
    PadEvaluation,
    leave_subjects_out,
    subject_folds,
    train_detector,
)
from facemetric.pad.lbp import LbpConfig, LbpDetector, train_lbp

__all__ = [
    "DETECTOR_KINDS",
    "CnnConfig",
    "CnnDetector",
    "LbpConfig",
    "LbpDetector",
    "PadDetector",
    "PadEvaluation",
    "PadFaces",
    "PadInput",
    "crop_faces",
    "leave_subjects_out",
    "load_detector",
    "load_pad_faces",
    "scan_pad_folder",
    "subject_folds",
    "train_cnn",
    "train_detector",
    "train_lbp",
]
