"""Embed the identification sets of ``benchmarks/rerank.py`` once and cache them.

LFW DevTest (every image of ``peopleDevTest.txt``) and CFP (10 frontal + 4 profile images
of each of 500 people). A trained run embeds the aligned 112×112 caches (``make demo``:
``cache/lfw112``, ``cache/cfp112``); ``dlib`` runs its own pipeline on the raw photos
(HOG detection, the face nearest the centre, dlib's 150 px chip), so an image where dlib
finds no face gets a NaN row (CFP profiles mostly). Output: ``<out>/<tag>_<set>.npz`` with
``embeddings (N, D)`` float32, ``labels (N,)`` and ``kind (N,)`` (``frontal``/``profile``
for CFP, ``lfw`` for LFW).

    .venv/bin/python benchmarks/rerank_embed.py --model runs/demo/train --tag demo
    .venv/bin/python benchmarks/rerank_embed.py --model dlib --tag dlib --sets lfw
    .venv/bin/python benchmarks/rerank_embed.py --model dlib --tag dlib --sets cfp --cfp-people 150
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def lfw_items(lfw: Path) -> list[tuple[str, str, str]]:
    """``(label, relative path, kind)`` of every image of ``peopleDevTest.txt``."""
    rows = (lfw / "peopleDevTest.txt").read_text().split("\n")[1:]
    out = []
    for r in rows:
        if r.strip():
            name, count = r.split()[0], int(r.split()[1])
            out += [(name, f"{name}/{name}_{k:04d}", "lfw") for k in range(1, count + 1)]
    return out


def cfp_items(people: int = 500) -> list[tuple[str, str, str]]:
    """``(label, relative path, kind)`` of CFP's first ``people`` (of 500) × (10 frontal +
    4 profile) images."""
    return [(f"{p:03d}", f"{p:03d}/{kind}/{i:02d}", kind) for p in range(1, people + 1)
            for kind, n in (("frontal", 10), ("profile", 4)) for i in range(1, n + 1)]


def embed_aligned(encoder, root: Path, items: list[tuple[str, str, str]]) -> np.ndarray:
    from facemetric.inference.encoder import embed_files

    return embed_files(encoder, [root / f"{rel}.jpg" for _, rel, _ in items],
                       batch_size=64).embeddings


def embed_raw(encoder, root: Path, items: list[tuple[str, str, str]]) -> np.ndarray:
    from tqdm import tqdm

    from facemetric.recognizer import Recognizer

    rec = Recognizer(encoder)
    out = np.full((len(items), encoder.contract.embedding_size), np.nan, np.float32)
    paths = [root / f"{rel}.jpg" for _, rel, _ in items]
    for a in tqdm(range(0, len(paths), 32), desc="embed", unit="batch"):
        for j, found in enumerate(rec.embed(paths[a:a + 32], policy="centre")):
            if found.ok:
                out[a + j] = found.faces[0].embedding
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="run folder, .onnx or 'dlib'")
    ap.add_argument("--tag", required=True, help="file name prefix of the cache")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get(
        "FACEMETRIC_DATA", "../shared/data")))
    ap.add_argument("--aligned", type=Path, default=Path("cache"),
                    help="folder of lfw112/ and cfp112/ (trained models)")
    ap.add_argument("--out", type=Path, default=Path("cache/rerank"))
    ap.add_argument("--sets", default="lfw,cfp")
    ap.add_argument("--cfp-people", type=int, default=500,
                    help="embed CFP's first N people only (dlib runs ~3 photos/s)")
    args = ap.parse_args()

    import torch

    from facemetric.inference import load_model

    torch.set_num_threads(2)
    encoder = load_model(args.model)
    raw = encoder.contract.template != "arcface112"
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        items = lfw_items(args.data / "lfw") if name == "lfw" else cfp_items(args.cfp_people)
        if raw:
            root = (args.data / "lfw" / "lfw-deepfunneled" if name == "lfw"
                    else args.data / "cfp" / "Data" / "Images")
            start = time.perf_counter()
            emb = embed_raw(encoder, root, items)
        else:
            start = time.perf_counter()
            emb = embed_aligned(encoder, args.aligned / f"{name}112", items)
        seconds = time.perf_counter() - start
        target = args.out / f"{args.tag}_{name}.npz"
        np.savez(target, embeddings=emb, labels=np.array([i[0] for i in items]),
                 kind=np.array([i[2] for i in items]), model=str(args.model))
        bad = int(np.isnan(emb).any(axis=1).sum())
        print(f"{target}: {len(items)} images, {bad} without an embedding, {seconds:.0f} s")


if __name__ == "__main__":
    main()
