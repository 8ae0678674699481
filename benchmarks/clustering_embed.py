"""Embeddings for the clustering benchmark, cached: LFW DevTest identities (every image of
every person in peopleDevTest.txt) and CFP (all 500 identities, frontal + profile), from
the aligned 112×112 faces `make demo` caches (cache/lfw112, cache/cfp112).

    .venv/bin/python benchmarks/clustering_embed.py --model runs/demo/train --name demo
    .venv/bin/python benchmarks/clustering_embed.py --model dlib --name dlib

Writes cache/clustering/<name>_<set>.npz (embeddings float32, labels int, paths). dlib
takes ~10 faces/s; its chips are the arcface112 crops resized to 150 px (dlib's own chip is
framed differently: this costs dlib some accuracy, stated with the results).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from facemetric.inference import load_model


def lfw_devtest(lfw: Path, aligned: Path) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    lines = (lfw / "peopleDevTest.txt").read_text().split("\n")[1:]
    for person, line in enumerate(x for x in lines if x.strip()):
        name, count = line.split()
        for k in range(1, int(count) + 1):
            p = aligned / name / f"{name}_{k:04d}.jpg"
            if p.exists():
                paths.append(p)
                labels.append(person)
    return paths, labels


def lfw_devtrain(lfw: Path, aligned: Path, limit: int = 2000) -> tuple[list[Path], list[int]]:
    """The first ``limit`` images of peopleDevTrain (for calibrating a threshold on
    identities disjoint from DevTest)."""
    paths, labels = [], []
    lines = (lfw / "peopleDevTrain.txt").read_text().split("\n")[1:]
    for person, line in enumerate(x for x in lines if x.strip()):
        name, count = line.split()
        for k in range(1, int(count) + 1):
            p = aligned / name / f"{name}_{k:04d}.jpg"
            if p.exists() and len(paths) < limit:
                paths.append(p)
                labels.append(person)
    return paths, labels


def cfp_all(aligned: Path) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for person in sorted(p for p in aligned.iterdir() if p.is_dir()):
        for view in ("frontal", "profile"):
            for p in sorted((person / view).glob("*.jpg")):
                paths.append(p)
                labels.append(int(person.name))
    return paths, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEMETRIC_DATA",
                                                                      "../shared/data")))
    ap.add_argument("--cache", type=Path, default=Path("cache"))
    ap.add_argument("--sets", default="lfw,cfp")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    encoder = load_model(args.model)
    for name in args.sets.split(","):
        out = args.cache / "clustering" / f"{args.name}_{name}.npz"
        if out.exists():
            print(f"{out} exists")
            continue
        if name == "lfw":
            paths, labels = lfw_devtest(args.data / "lfw", args.cache / "lfw112")
        elif name == "devtrain":
            paths, labels = lfw_devtrain(args.data / "lfw", args.cache / "lfw112")
        else:
            paths, labels = cfp_all(args.cache / "cfp112")
        rows = []
        for s in tqdm(range(0, len(paths), 64), desc=f"{args.name} {name}", unit="batch"):
            faces = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[s:s + 64]])
            rows.append(encoder.embed_faces(faces))
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, embeddings=np.concatenate(rows), labels=np.asarray(labels),
                 paths=np.asarray([str(p) for p in paths]))
        print(f"{out}: {len(paths)} faces of {len(set(labels))} identities")


if __name__ == "__main__":
    main()
