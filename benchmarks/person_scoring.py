"""Per-person scoring in 1:N search: the best template (``max``) against the normalised
mean of the person's templates (``mean``), on LFW DevTest.

Every DevTest identity with at least ``t + 1`` photos (capped at ``--cap`` photos) is embedded
once through ``Recognizer.embed`` (detection, alignment, the model). For ``t`` = 1, 2, 3
templates per person, the first ``t`` photos are enrolled into a ``TemplateIndex`` and every
other photo of those people is a probe; rank-1 and rank-5 are reported for both scorings
(with ``t = 1`` they are the same search, a sanity row).

    .venv/bin/python benchmarks/person_scoring.py --lfw ../shared/data/lfw --model dlib
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, required=True)
    ap.add_argument("--model", default="dlib")
    ap.add_argument("--cap", type=int, default=8, help="photos per identity at most")
    ap.add_argument("--max-templates", type=int, default=3)
    args = ap.parse_args()

    from tqdm import tqdm

    from facemetric.index import TemplateIndex
    from facemetric.recognizer import Recognizer

    rows = (args.lfw / "peopleDevTest.txt").read_text().split("\n")[1:]
    people = [(r.split()[0], int(r.split()[1])) for r in rows if r.strip()]
    chosen = [(n, min(c, args.cap)) for n, c in people if c >= args.max_templates + 1]
    rec = Recognizer(args.model)
    emb: dict[str, list[np.ndarray]] = {}
    for name, count in tqdm(chosen, desc="embed", unit="person"):
        paths = [args.lfw / "lfw-deepfunneled" / name / f"{name}_{k:04d}.jpg"
                 for k in range(1, count + 1)]
        faces = rec.embed(paths, policy="centre")
        emb[name] = [f.faces[0].embedding for f in faces if f.ok]
    names = [n for n in emb if len(emb[n]) >= args.max_templates + 1]
    print(f"{len(names)} identities with ≥ {args.max_templates + 1} usable photos "
          f"(≤ {args.cap} each), model {rec.contract.describe()}\n")
    print("| templates per person | probes | rank-1 max | rank-1 mean | rank-5 max | "
          "rank-5 mean |\n|---:|---:|---:|---:|---:|---:|")
    for t in range(1, args.max_templates + 1):
        index = TemplateIndex(rec.contract.embedding_size)
        ids, owners, vecs = [], [], []
        for p, name in enumerate(names):
            for j in range(t):
                ids.append(len(ids))
                owners.append(p)
                vecs.append(emb[name][j])
        index.add(np.array(ids), np.array(owners), np.stack(vecs))
        probes = [(p, e) for p, name in enumerate(names) for e in emb[name][args.max_templates:]]
        q = np.stack([e for _, e in probes])
        truth = np.array([p for p, _ in probes])
        out = []
        for mode in ("max", "mean"):
            hits = index.search_owners(q, 5, mode=mode).ids.numpy()
            out.append((float(np.mean(hits[:, 0] == truth)),
                        float(np.mean((hits == truth[:, None]).any(axis=1)))))
        print(f"| {t} | {len(probes)} | {100 * out[0][0]:.2f}% | {100 * out[1][0]:.2f}% | "
              f"{100 * out[0][1]:.2f}% | {100 * out[1][1]:.2f}% |")


if __name__ == "__main__":
    main()
