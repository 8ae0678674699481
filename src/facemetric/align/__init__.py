"""Face detection, landmarks and similarity alignment to the 112×112 ArcFace template.

Pipeline per image: dlib HOG (or MMOD CNN) detection → the face nearest the image centre →
dlib landmarks (68-point by default) → the template's five points (eye centres, nose tip,
mouth corners) → least-squares similarity (Umeyama) → ``cv2.warpAffine`` to 112×112 RGB.
Given landmarks (a 5-point file, CFP's 30 fiducials, 68 iBUG points) replace detection.

The warp (:mod:`~facemetric.align.warp`) needs only numpy and OpenCV; detection needs the
``detect`` extra (``pip install 'facemetric[detect]'``: dlib and its model files).

Measured on 60 LFW deep-funneled images (every 97th identity, first image; default
settings): RMS residual of the five-point fit 3.5 px (112×112 output pixels); 68-point
landmarks re-detected on the aligned faces put the five points 3.1 px (mean; max 5.4) from
the template; the 5-point model's fit moves them 2.2 px (mean; 2.1 px on 59 other
identities) from where the 68-point fit puts them. On 30 CFP frontal images, the
fiducial-based fit puts dlib's five points 2.9 px (mean) from the template. Throughput
on LFW, one process: 45–60 img/s on a busy 2-core machine (detection at the original size
finds every LFW face, so upsampling is never paid for).
"""

from facemetric.align.aligner import (
    ALIGNED_STATUSES,
    AlignResult,
    AlignStatus,
    FaceAligner,
)
from facemetric.align.detect import DETECTORS, LANDMARK_MODELS, Face, FaceDetector, model_file
from facemetric.align.folder import AlignReport, ImageRecord, align_folder
from facemetric.align.landmarks import (
    DLIB5_NOSE_BASE,
    SCHEMES,
    read_landmark_file,
    template_correspondences,
)
from facemetric.align.templates import warp_to_template
from facemetric.align.warp import (
    ALIGNED_SIZE,
    ARCFACE_TEMPLATE,
    centre_crop,
    estimate_similarity,
    transform_points,
    warp_affine,
)

__all__ = [
    "ALIGNED_SIZE",
    "ALIGNED_STATUSES",
    "ARCFACE_TEMPLATE",
    "DETECTORS",
    "DLIB5_NOSE_BASE",
    "LANDMARK_MODELS",
    "SCHEMES",
    "AlignReport",
    "AlignResult",
    "AlignStatus",
    "Face",
    "FaceAligner",
    "FaceDetector",
    "ImageRecord",
    "align_folder",
    "centre_crop",
    "estimate_similarity",
    "model_file",
    "read_landmark_file",
    "template_correspondences",
    "transform_points",
    "warp_affine",
    "warp_to_template",
]
