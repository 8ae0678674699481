"""Acceptance of the recognition API on LFW DevTest: enroll one photo per identity through
``Recognizer.enroll``, identify every other photo (and people never enrolled) through
``Recognizer``'s search, and compare with the offline evaluator
(``facemetric.evaluation.identification``) on the very same embeddings.

Split (identities disjoint from DevTrain):
- gallery: the first photo of every DevTest identity with at least two photos;
- mated probes: their other photos;
- non-mated probes: the photo of every DevTest identity with exactly one photo.

Thresholds: the model is calibrated on DevTrain photos (every pair of the first
``--calibration-images`` photos that yield a face), never on DevTest. Reported:
rank-1 and DIR@FPIR from the API and offline (they must agree), and the operational answer
at the calibrated FAR 1e-3 (DIR and the measured FPIR).

    .venv/bin/python benchmarks/recognizer_lfw.py --lfw ../shared/data/lfw --model dlib
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _people(path: Path) -> list[tuple[str, int]]:
    rows = path.read_text().split("\n")[1:]
    return [(r.split()[0], int(r.split()[1])) for r in rows if r.strip()]


def _embed_all(rec, paths: list[Path], batch: int = 32) -> list:
    from tqdm import tqdm

    out = []
    for a in tqdm(range(0, len(paths), batch), desc="embed", unit="batch"):
        out.extend(rec.embed(paths[a:a + batch], policy="centre"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, required=True)
    ap.add_argument("--model", default="dlib", help="run folder, .onnx or 'dlib'")
    ap.add_argument("--calibration-images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("runs/recognizer_lfw.json"))
    args = ap.parse_args()

    from facemetric.evaluation.identification import cmc_curve, open_set_identification
    from facemetric.inference import Threshold, all_pair_scores, calibrate, load_model
    from facemetric.recognizer import UNKNOWN, Recognizer

    started = time.perf_counter()
    photos = args.lfw / "lfw-deepfunneled"
    encoder = load_model(args.model)
    plain = Recognizer(encoder)

    # 1. calibrate on DevTrain photos (identities disjoint from DevTest)
    train = [(n, photos / n / f"{n}_{k:04d}.jpg") for n, c in _people(
        args.lfw / "peopleDevTrain.txt") for k in range(1, c + 1)][: args.calibration_images]
    found = _embed_all(plain, [p for _, p in train])
    ok = [i for i, f in enumerate(found) if f.ok]
    emb = np.stack([found[i].faces[0].embedding for i in ok])
    genuine, impostor = all_pair_scores(emb, np.array([train[i][0] for i in ok]))
    table = calibrate(impostor, encoder.contract.fingerprint(), genuine_scores=genuine,
                      source=f"all pairs of {len(ok)} LFW DevTrain photos")
    print(table.summary())

    # 2. enroll through the API
    test = _people(args.lfw / "peopleDevTest.txt")
    several = [n for n, c in test if c >= 2]
    singles = [n for n, c in test if c == 1]
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recognizer(encoder, Path(tmp) / "g.db", thresholds=table)
        t0 = time.perf_counter()
        enrolled = {}
        for n in several:
            res = rec.enroll(n, [photos / n / f"{n}_0001.jpg"], policy="centre")
            if res.accepted:
                enrolled[n] = res.outcomes[0].face_id
        enroll_s = time.perf_counter() - t0
        snap = rec.store.templates("default")
        names = {p.id: p.name for p in rec.persons_records()}
        g_emb, g_lab = snap.matrix, np.array([names[i] for i in snap.person_ids.tolist()])

        # 3. identify through the API (embedded once, searched by the recognizer)
        probes = [(n, photos / n / f"{n}_{k:04d}.jpg") for n, c in test if n in enrolled
                  for k in range(2, c + 1)] + [(n, photos / n / f"{n}_0001.jpg")
                                               for n in singles]
        t0 = time.perf_counter()
        found = _embed_all(rec, [p for _, p in probes])
        ok = [i for i, f in enumerate(found) if f.ok]
        p_emb = np.stack([found[i].faces[0].embedding for i in ok])
        p_lab = np.array([probes[i][0] for i in ok])
        mated = np.isin(p_lab, g_lab)
        kept = [found[i] for i in ok]
        top1 = rec.identify_embeddings(kept, 1, Threshold(-2.0, 1.0, 0))
        api_rank1 = float(np.mean(np.array([a.best for a in top1])[mated] == p_lab[mated]))
        identify_s = time.perf_counter() - t0

        # 4. offline on the same embeddings
        cmc = cmc_curve(g_emb, g_lab, p_emb[mated], p_lab[mated])
        fpirs = (1e-2, 1e-1)
        off = open_set_identification(g_emb, g_lab, p_emb, p_lab, fpir_targets=fpirs)
        rows = {}
        for f in fpirs:
            t = off.threshold_at_fpir[f]
            if t is None:
                continue
            ans = np.array([a.best for a in rec.identify_embeddings(
                kept, 1, Threshold(float(t) + 1e-5, f, 0))])
            rows[f] = {
                "offline_dir": off.dir_at_fpir[f],
                "api_dir": float(np.mean(ans[mated] == p_lab[mated])),
                "api_fpir": float(np.mean(ans[~mated] != UNKNOWN)),
            }
        op = np.array([a.best for a in rec.identify_embeddings(kept, 1, rec.threshold(1e-3))])
        operational = {
            "threshold": rec.threshold(1e-3).value,
            "dir": float(np.mean(op[mated] == p_lab[mated])),
            "fpir": float(np.mean(op[~mated] != UNKNOWN)),
        }
        rec.close()
    result = {
        "model": encoder.contract.to_dict(),
        "gallery": len(g_lab), "mated_probes": int(mated.sum()),
        "nonmated_probes": int((~mated).sum()),
        "probes_without_face": len(probes) - len(ok),
        "rank1": {"offline": cmc.rank1, "api": api_rank1},
        "dir_at_fpir": rows, "at_far_1e-3": operational,
        "calibration": table.to_dict(),
        "seconds": {"enroll": enroll_s, "identify": identify_s,
                    "total": time.perf_counter() - started},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\ngallery {len(g_lab)} identities, {int(mated.sum())} mated and "
          f"{int((~mated).sum())} non-mated probes ({len(probes) - len(ok)} without a face)")
    print("| measure | offline evaluator | through the API |\n|---|---:|---:|")
    print(f"| rank-1 | {100 * cmc.rank1:.2f}% | {100 * api_rank1:.2f}% |")
    for f, r in rows.items():
        print(f"| DIR @ FPIR {f:g} | {100 * r['offline_dir']:.2f}% | {100 * r['api_dir']:.2f}% "
              f"(FPIR {100 * r['api_fpir']:.2f}%) |")
    print(f"\nat the calibrated FAR 1e-3 (threshold {operational['threshold']:.4f}): DIR "
          f"{100 * operational['dir']:.2f}%, FPIR {100 * operational['fpir']:.2f}%")
    print(f"enroll {len(g_lab)} photos {enroll_s:.0f} s; embed+identify {len(probes)} probes "
          f"{identify_s:.0f} s; written {args.out}")


if __name__ == "__main__":
    main()
