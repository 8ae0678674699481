"""``Recognizer`` end to end on real LFW photos: detection, alignment, embedding, a real
SQLite gallery and index — every score checked against a direct float64 computation, the
open-set answers against the offline evaluator, every bad input against its typed reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facemetric.evaluation.identification import open_set_identification
from facemetric.inference import ModelContract, ThresholdTable, TorchEncoder, calibrate
from facemetric.inference.calibration import CalibrationEntry
from facemetric.recognizer import UNKNOWN, Problem, Recognizer

pytestmark = [pytest.mark.data]


class PixelProjection(torch.nn.Module):
    """A fixed random projection of the mean-centred face pixels: a real, deterministic
    encoder whose embeddings differ between faces (a randomly initialised CNN maps every
    face to nearly the same direction, which would make ranking tests vacuous)."""

    def __init__(self, side: int, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(3 * side * side, dim, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return (x - x.mean(1, keepdim=True)) @ self.w


def _encoder(seed: int = 0, dim: int = 32) -> TorchEncoder:
    contract = ModelContract(backbone="pixel_projection", input_size=24, template="arcface112",
                             embedding_size=dim, weights_sha256=f"test-{seed}-{dim}")
    return TorchEncoder(PixelProjection(24, dim, seed).eval(), contract, channels_last=False)


def _table(encoder: TorchEncoder, thresholds: dict[float, float]) -> ThresholdTable:
    entries = tuple(CalibrationEntry(f, t, 0, 1000) for f, t in sorted(thresholds.items()))
    return ThresholdTable(encoder.contract.fingerprint(), entries, "test", 1000, 0)


@pytest.fixture(scope="module")
def people(lfw_root: Path) -> dict[str, list[Path]]:
    """DevTest identities with at least 3 images (first 12) and 8 with exactly one."""
    root = lfw_root / "lfw-deepfunneled"
    many: dict[str, list[Path]] = {}
    single: dict[str, list[Path]] = {}
    for line in (lfw_root / "peopleDevTest.txt").read_text().split("\n")[1:]:
        if not line.strip():
            continue
        name, count = line.split()
        paths = sorted((root / name).glob("*.jpg"))
        if int(count) >= 3 and len(many) < 12:
            many[name] = paths[:3]
        elif int(count) == 1 and len(single) < 8:
            single[name] = paths
    return {**many, **{f"single:{k}": v for k, v in single.items()}}


def test_identify_scores_are_per_person_max_cosines(people, tmp_path):
    enc = _encoder()
    rec = Recognizer(enc, tmp_path / "g.db", thresholds=_table(enc, {1e-3: 0.5}))
    names = [n for n in people if not n.startswith("single:")][:6]
    for name in names:
        res = rec.enroll(name, people[name][:2], policy="centre")
        assert res.accepted == 2, res
    probe = people[names[0]][2]
    got = rec.identify(probe, k=10, policy="centre")
    # reference: embed the probe and every enrolled photo through the same pipeline, then
    # a float64 max over each person's templates
    q = rec.embed([probe], "centre")[0].faces[0].embedding.astype(np.float64)
    expected = {}
    for name in names:
        emb = np.stack([f.faces[0].embedding for f in rec.embed(people[name][:2], "centre")])
        expected[name] = float(np.max(emb.astype(np.float64) @ q))
    ranked = sorted(expected.items(), key=lambda kv: -kv[1])
    assert [c.person for c in got.faces[0].candidates] == [n for n, _ in ranked]
    np.testing.assert_allclose([c.score for c in got.faces[0].candidates],
                               [s for _, s in ranked], atol=1e-5)
    assert all(c.templates == 2 for c in got.faces[0].candidates)
    top = got.faces[0]
    assert top.best == (ranked[0][0] if ranked[0][1] >= 0.5 else UNKNOWN)
    # mean-of-templates scoring: cosine to the normalised mean of normalised templates
    mean_rec = Recognizer(enc, tmp_path / "g.db", person_score="mean",
                          thresholds=_table(enc, {1e-3: 0.5}))
    got_mean = mean_rec.identify(probe, k=10, policy="centre").faces[0].candidates
    for c in got_mean:
        emb = np.stack([f.faces[0].embedding for f in rec.embed(people[c.person][:2], "centre")])
        centre = emb.astype(np.float64).sum(0)
        assert c.score == pytest.approx(float(centre @ q / np.linalg.norm(centre)), abs=1e-5)
    # remove: the person disappears from answers, the others stay
    assert rec.remove(names[0]) == 2
    after = rec.identify(probe, k=10, policy="centre").faces[0].candidates
    assert names[0] not in [c.person for c in after] and len(after) == len(names) - 1
    rec.close()
    mean_rec.close()


def test_open_set_answers_equal_the_offline_evaluator(people, tmp_path):
    """Enroll one photo per identity, identify the rest plus never-enrolled people: the API's
    DIR and FPIR at the offline evaluator's thresholds equal the offline numbers."""
    enc = _encoder(1)
    enrolled = [n for n in people if not n.startswith("single:")]
    strangers = [n for n in people if n.startswith("single:")]
    gallery_faces = {n: people[n][0] for n in enrolled}
    probes = [(n, p) for n in enrolled for p in people[n][1:]] + [
        (n, people[n][0]) for n in strangers]
    plain = Recognizer(enc)
    g = {n: im for n, p in gallery_faces.items() if (im := plain.embed([p], "centre")[0]).ok}
    embedded = [(n, p, plain.embed([p], "centre")[0]) for n, p in probes]
    kept = [(n, p, im) for n, p, im in embedded if im.ok]
    g_emb = np.stack([im.faces[0].embedding for im in g.values()])
    g_lab = np.array(list(g))
    p_emb = np.stack([im.faces[0].embedding for _, _, im in kept])
    p_lab = np.array([n for n, _, _ in kept])
    fpirs = (0.25, 0.5, 0.75)
    offline = open_set_identification(g_emb, g_lab, p_emb, p_lab, fpir_targets=fpirs)
    assert offline.num_mated > 5 and offline.num_nonmated >= 4

    # A threshold table whose "FAR" entries are the offline thresholds at each FPIR. The
    # offline threshold sits one float64 ulp above a non-mated score, and the index scores
    # in float32 blocks (equal to ~1e-7, not to the bit), so both sides use τ + 1e-5 — after
    # checking that no top score falls in [τ + 1e-6, τ + 1e-5), where the shift would flip a
    # decision (the non-mated score that defines τ lies within 1e-6 below or above it).
    top = (p_emb.astype(np.float64) @ g_emb.astype(np.float64).T).max(axis=1)
    finite = {}
    for f, t in offline.threshold_at_fpir.items():
        if t is None:
            continue
        t = float(t) if np.isfinite(t) else -2.0
        assert not np.any((top >= t + 1e-6) & (top < t + 1e-5)), f
        finite[f] = t + 1e-5
    rec = Recognizer(enc, tmp_path / "g.db", thresholds=_table(enc, finite))
    for name in g:
        assert rec.enroll(name, [gallery_faces[name]], policy="centre").accepted == 1
    mated = np.isin(p_lab, g_lab)
    for f in finite:
        answers = np.array([a.best for a in rec.identify_many([p for _, p, _ in kept], far=f,
                                                             policy="centre")])
        dir_api = float(np.mean(answers[mated] == p_lab[mated]))
        fpir_api = float(np.mean(answers[~mated] != UNKNOWN))
        assert dir_api == pytest.approx(offline.dir_at_fpir[f]), f
        assert fpir_api <= f + 1e-12
    rec.close()


# ---------------------------------------------------------------- bad input


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_enroll_rejects_each_bad_image_with_its_reason_and_stores_nothing(people, tmp_path):
    enc = _encoder()
    rec = Recognizer(enc, tmp_path / "g.db", thresholds=_table(enc, {1e-3: 0.5}))
    name = next(iter(people))
    photo = people[name][0]
    good = photo.read_bytes()
    rgb = Image.open(photo).convert("RGB")
    two = Image.new("RGB", (rgb.width * 2, rgb.height))
    two.paste(rgb, (0, 0))
    two.paste(Image.open(people[list(people)[1]][0]).convert("RGB"), (rgb.width, 0))
    cases = {
        "zero bytes": (b"", Problem.UNREADABLE),
        "not an image": (b"hello, I am text", Problem.UNREADABLE),
        "truncated": (good[: len(good) // 2], Problem.UNREADABLE),
        "bomb": (_png_header(30_000, 30_000), Problem.UNREADABLE),
        "1x1": (_encoded(Image.new("RGB", (1, 1)), "PNG"), Problem.NO_FACE),
        "noise": (_encoded(Image.fromarray(np.random.default_rng(0).integers(
            0, 255, (200, 200, 3), dtype=np.uint8)), "PNG"), Problem.NO_FACE),
        "two faces": (_encoded(two, "PNG"), Problem.SEVERAL_FACES),
    }
    res = rec.enroll("someone", [data for data, _ in cases.values()])
    for (what, (_, reason)), outcome in zip(cases.items(), res.outcomes, strict=True):
        assert not outcome.accepted and outcome.problem == reason, (what, outcome)
        assert outcome.detail
    assert rec.persons == []
    # other pixel formats of the same face are readable: CMYK, 16-bit grey, grey
    grey = rgb.convert("L")
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    variants = [_encoded(rgb.convert("CMYK"), "JPEG"), _encoded(sixteen, "PNG"),
                _encoded(grey, "PNG")]
    ok = rec.enroll(name, variants, policy="centre")
    # 16-bit and 8-bit grey decode to the same pixels: the second is a near-duplicate
    assert [o.accepted for o in ok.outcomes] == [True, True, False], ok
    assert ok.outcomes[2].problem == Problem.DUPLICATE and "near-identical" in ok.outcomes[2].detail
    # the same photo again, and a face too small for the minimum
    again = rec.enroll(name, [variants[0]], policy="centre")
    assert again.outcomes[0].problem == Problem.DUPLICATE
    strict = Recognizer(enc, tmp_path / "g.db", min_face_size=400,
                        thresholds=_table(enc, {1e-3: 0.5}))
    small = strict.enroll("other", [good], policy="centre")
    assert small.outcomes[0].problem == Problem.FACE_TOO_SMALL
    assert rec.persons == [name]
    rec.close()
    strict.close()


def test_exif_orientation_is_honoured(people, tmp_path):
    enc = _encoder()
    rec = Recognizer(enc)
    photo = next(iter(people.values()))[0]
    upright = Image.open(photo).convert("RGB")
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag that says "rotate 90° clockwise to view"
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", quality=98, exif=exif.tobytes())
    a = rec.embed([_encoded(upright, "PNG")], "centre")[0]
    b = rec.embed([buf.getvalue()], "centre")[0]
    assert a.ok and b.ok
    assert float(a.faces[0].embedding @ b.faces[0].embedding) > 0.97


def test_verify_decides_with_the_calibrated_threshold(people, tmp_path):
    enc = _encoder(2)
    names = [n for n in people if not n.startswith("single:")]
    photos = [p for n in names for p in people[n]]
    labels = [n for n in names for _ in people[n]]
    rec0 = Recognizer(enc)
    embs = [rec0.embed([p], "centre")[0] for p in photos]
    keep = [i for i, e in enumerate(embs) if e.ok]
    e = np.stack([embs[i].faces[0].embedding for i in keep]).astype(np.float64)
    y = np.array(labels)[keep]
    sims = e @ e.T
    iu = np.triu_indices(len(keep), 1)
    impostor = sims[iu][(y[:, None] != y[None, :])[iu]]
    table = calibrate(impostor, enc.contract.fingerprint(), fars=[0.1])
    rec = Recognizer(enc, thresholds=table)
    a, b = photos[keep[0]], photos[keep[1]]
    v = rec.verify(a, b, far=0.1, policy="centre")
    assert v.score == pytest.approx(float(sims[0, 1]), abs=1e-5)
    assert v.threshold.far == 0.1 and v.threshold.impostors == len(impostor)
    assert v.same == (v.score >= v.threshold.value)
    # the calibrated FAR holds on the data it came from
    assert np.mean(impostor >= table.threshold(0.1).value) <= 0.1
    with pytest.raises(ValueError, match="calibrated at FARs"):
        rec.verify(a, b, far=1e-6)
    with pytest.raises(ValueError, match="no calibrated thresholds"):
        Recognizer(enc).verify(a, b)
    bad = rec.verify(a, b"garbage", far=0.1)
    assert bad.same is None and bad.b.problem == Problem.UNREADABLE


def test_a_collection_refuses_another_model_and_reembeds_from_its_crops(people, tmp_path):
    from facemetric.gallery import ContractMismatchError

    old, new = _encoder(3), _encoder(4, dim=24)
    rec = Recognizer(old, tmp_path / "g.db")
    names = [n for n in people if not n.startswith("single:")][:3]
    for n in names:
        assert rec.enroll(n, people[n][:2], policy="centre").accepted == 2
    rec.close()
    with pytest.raises(ContractMismatchError, match="reembed"):
        Recognizer(new, tmp_path / "g.db")
    moved = Recognizer.for_reembedding(new, tmp_path / "g.db")
    assert moved.reembed(progress=False) == 6
    moved.close()
    fresh = Recognizer(new, tmp_path / "g.db", thresholds=_table(new, {1e-3: 0.0}))
    probe = people[names[1]][0]
    got = fresh.identify(probe, k=3, policy="centre").faces[0]
    # the re-embedded template of that very photo: the crop re-aligned ≈ the photo aligned
    assert got.candidates[0].person == names[1]
    assert got.candidates[0].score > 0.99
    fresh.close()
