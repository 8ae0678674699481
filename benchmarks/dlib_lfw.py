"""The evaluator on an independent, known model: dlib's face descriptor on LFW View 2.

dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat`` from the
``face_recognition_models`` package, trained on ~3M outside faces) publishes 99.38% on LFW
View 2. This script embeds every image of ``pairs.txt`` with dlib's own pipeline (HOG
detection, the face nearest the image centre, 5-point shape, 150×150 chip, 128-d
descriptor), scores pairs by negative Euclidean distance, and feeds the scores to
``facemetric.evaluation.verification_report`` with View 2's own ten folds. If our protocol
code is right, the accuracy lands near the published figure.

    .venv/bin/python benchmarks/dlib_lfw.py --lfw ../shared/data/lfw [--out runs/dlib_lfw]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facemetric.align.detect import model_file
from facemetric.data.images import ImageLoadError, load_image
from facemetric.evaluation import read_lfw_pairs, verification_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, required=True, help="LFW root (pairs.txt, images)")
    ap.add_argument("--pairs", default="pairs.txt", help="protocol file inside --lfw")
    ap.add_argument("--out", type=Path, default=Path("runs/dlib_lfw"))
    ap.add_argument("--folds", type=int, default=10, help="use the first N folds (time)")
    args = ap.parse_args()

    import dlib

    detector = dlib.get_frontal_face_detector()
    shape_predictor = dlib.shape_predictor(str(model_file("shape_predictor_5_face_landmarks.dat")))
    encoder = dlib.face_recognition_model_v1(
        str(model_file("dlib_face_recognition_resnet_model_v1.dat"))
    )
    pairs = read_lfw_pairs(args.lfw / args.pairs, args.lfw / "lfw-deepfunneled")
    if args.folds < 10:
        keep = np.flatnonzero(pairs.fold < args.folds)
        pairs = type(pairs)(
            tuple(pairs.path_a[i] for i in keep),
            tuple(pairs.path_b[i] for i in keep),
            pairs.is_same[keep],
            pairs.fold[keep],
        )
    images, index_a, index_b = pairs.unique_images()
    desc = np.full((len(images), 128), np.nan)
    no_face = 0
    start = time.perf_counter()
    for i, path in enumerate(tqdm(images, desc="dlib", unit="img")):
        try:
            img = load_image(path)
        except ImageLoadError as err:
            print(err)
            continue
        faces = list(detector(img, 1))
        h, w = img.shape[:2]
        if faces:
            cx, cy = w / 2, h / 2
            rect = min(faces, key=lambda r: (r.center().x - cx) ** 2 + (r.center().y - cy) ** 2)
        else:  # deep-funneled centres the face: a centre box is dlib's own fallback too
            no_face += 1
            rect = dlib.rectangle(w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        shape = shape_predictor(img, rect)
        desc[i] = np.asarray(encoder.compute_face_descriptor(img, shape))
    seconds = time.perf_counter() - start

    scores = -np.linalg.norm(desc[index_a] - desc[index_b], axis=1)
    report = verification_report(scores, pairs.is_same, folds=pairs.fold)
    fixed = float(((-scores < 0.6) == pairs.is_same).mean())  # dlib's documented threshold
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "pairs": len(scores),
        "folds": len(np.unique(pairs.fold)),
        "images": len(images),
        "no_face_centre_box": no_face,
        "seconds": seconds,
        "accuracy": report.accuracy,
        "accuracy_std": report.accuracy_std,
        "auc": report.auc,
        "eer": report.eer,
        "accuracy_at_dlib_threshold_0.6": fixed,
        "published_accuracy": 0.9938,
    }
    (args.out / "dlib_lfw.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
