"""Enrollment end to end — decode, detect, align, embed, store — against the
dlib / face_recognition pipeline, images per second on one core, in one run.

Ours: ``Recognizer.enroll`` into a fresh SQLite gallery (one photo per person, so every
image is decoded, detected with dlib HOG + 68 landmarks, aligned to the model's template,
embedded with flip test, checked for duplicates and committed with ``synchronous=FULL``).
The model is a MobileFaceNet at 64 px, D = 256 — the shape ``make demo`` trains (its
weights do not change the speed) — run by torch or by onnxruntime from an ONNX export.

Peer: what ``face_recognition.face_encodings(face_recognition.load_image_file(p))`` does —
PIL decode, dlib HOG detection with one upsampling (its default), the 5-point shape, and
dlib's ResNet descriptor (``num_jitters=1``) — called directly through dlib.

Both run on one thread (``torch.set_num_threads(1)``, onnxruntime ``intra_op=1``, dlib is
single-threaded here), over the same LFW photos, alternating, best of ``--repeats``.

    .venv/bin/python benchmarks/enrollment.py --lfw ../shared/data/lfw [--images 120]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _photos(lfw: Path, count: int) -> list[Path]:
    rows = (lfw / "peopleDevTest.txt").read_text().split("\n")[1:]
    names = [r.split()[0] for r in rows if r.strip()]
    return [lfw / "lfw-deepfunneled" / n / f"{n}_0001.jpg" for n in names[:count]]


def _peer(photos: list[Path]) -> float:
    import dlib
    from PIL import Image

    from facemetric.align.detect import model_file

    detector = dlib.get_frontal_face_detector()
    shape = dlib.shape_predictor(str(model_file("shape_predictor_5_face_landmarks.dat")))
    net = dlib.face_recognition_model_v1(
        str(model_file("dlib_face_recognition_resnet_model_v1.dat")))
    start = time.perf_counter()
    for p in photos:
        img = np.array(Image.open(p).convert("RGB"))
        for rect in detector(img, 1):
            np.array(net.compute_face_descriptor(img, shape(img, rect), 1))
    return len(photos) / (time.perf_counter() - start)


def _ours(photos: list[Path], model: object) -> float:
    from facemetric.recognizer import Recognizer

    with tempfile.TemporaryDirectory() as tmp:
        rec = Recognizer(model, Path(tmp) / "g.db")
        rec.pipeline._detector()  # load dlib's models before the clock starts
        start = time.perf_counter()
        accepted = 0
        for i, p in enumerate(photos):
            accepted += rec.enroll(f"person {i}", [p], policy="largest").accepted
        seconds = time.perf_counter() - start
        rec.close()
    return len(photos) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, required=True)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    print(f"load average before the run: {load:.2f} "
          f"({'idle' if load < 0.5 else 'BUSY: numbers are pessimistic'})")
    from facemetric.inference import ModelContract, TorchEncoder, sha256_of_tensors
    from facemetric.inference.onnx import OnnxEncoder, export_onnx
    from facemetric.models import build_model

    torch.manual_seed(0)
    net = build_model("mobilefacenet", 256, input_size=64).eval()
    contract = ModelContract(backbone="mobilefacenet", input_size=64, template="arcface112",
                             embedding_size=256, weights_sha256=sha256_of_tensors(
                                 net.state_dict()))
    torch_encoder = TorchEncoder(net, contract)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(torch_encoder, Path(tmp) / "m.onnx")
        onnx_encoder = OnnxEncoder(onnx_path, threads=1)
        photos = _photos(args.lfw, args.images)
        best = {"dlib / face_recognition": 0.0, "facemetric (torch)": 0.0,
                "facemetric (ONNX)": 0.0}
        for _ in range(args.repeats):
            best["dlib / face_recognition"] = max(best["dlib / face_recognition"],
                                                  _peer(photos))
            best["facemetric (torch)"] = max(best["facemetric (torch)"],
                                             _ours(photos, torch_encoder))
            best["facemetric (ONNX)"] = max(best["facemetric (ONNX)"],
                                            _ours(photos, onnx_encoder))
    peer = best["dlib / face_recognition"]
    print(f"\n{len(photos)} LFW photos, one thread, best of {args.repeats}\n")
    print("| pipeline | img/s per core | vs dlib |\n|---|---:|---:|")
    for name, rate in best.items():
        print(f"| {name} | {rate:.1f} | {rate / peer:.2f}× |")
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
