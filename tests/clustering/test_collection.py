"""Clustering real LFW photos end to end with dlib's descriptor: the stateless
``cluster_images`` (a photo holding two faces of one person never yields one cluster), the
incremental ``PhotoCollection`` (only new photos embedded, new faces join their person,
user decisions survive, a corrupt file is reported not fatal, another model refused), the
exports, and ``facemetric cluster`` through the CLI."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemetric.clustering import (
    ClusterOptions,
    PhotoCollection,
    cannot_link_violations,
    cluster_embeddings,
    cluster_images,
)
from facemetric.inference import ThresholdTable
from facemetric.inference.calibration import CalibrationEntry

pytestmark = [pytest.mark.data]

# dlib's descriptor calibrated on all pairs of the first 1,995 LFW DevTrain photos through
# the recognizer's own pipeline (docs/benchmarks.md, "The API against the offline
# evaluator"): identities disjoint from the DevTest people clustered here.
DLIB_CALIBRATION = {1e-4: 0.93681, 1e-3: 0.92355, 1e-2: 0.90541}


@pytest.fixture(scope="module")
def recognizer():
    from facemetric.inference import load_model
    from facemetric.recognizer import Recognizer

    enc = load_model("dlib")
    entries = tuple(CalibrationEntry(f, t, round(f * 1_952_877), 1_952_877)
                    for f, t in sorted(DLIB_CALIBRATION.items()))
    table = ThresholdTable(enc.contract.fingerprint(), entries, "LFW DevTrain (dlib)",
                           1_952_877, 36_138)
    return Recognizer(enc, thresholds=table)


@pytest.fixture(scope="module")
def people(lfw_root: Path) -> dict[str, list[Path]]:
    """The first 5 DevTest people with at least 4 photos in which dlib finds exactly one
    face (news photos often hold a second face in the background): those 4 photos."""
    from facemetric.align.detect import FaceDetector
    from facemetric.data.images import load_image

    detector = FaceDetector(upsample=1)
    root = lfw_root / "lfw-deepfunneled"
    out: dict[str, list[Path]] = {}
    for line in (lfw_root / "peopleDevTest.txt").read_text().split("\n")[1:]:
        if not line.strip() or int(line.split()[1]) < 4:
            continue
        name = line.split()[0]
        alone = [p for p in sorted((root / name).glob("*.jpg"))[:6]
                 if len(detector.detect(load_image(p))) == 1]
        if len(alone) >= 4:
            out[name] = alone[:4]
        if len(out) == 5:
            return out
    raise AssertionError("fewer than 5 DevTest people with 4 single-face photos")


def side_by_side(a: Path, b: Path) -> bytes:
    left, right = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
    both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    buf = io.BytesIO()
    both.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_two_faces_of_one_photo_never_share_a_cluster(recognizer, people):
    names = list(people)
    a = names[0]
    images: list = [people[n][k] for n in names[1:] for k in (0, 1)]
    truth = [n for n in names[1:] for _ in (0, 1)]
    # one photo with two different photos of person a side by side, and a third photo of a
    images += [side_by_side(people[a][0], people[a][1]), people[a][2]]
    res = cluster_images(recognizer, images, ClusterOptions(far=1e-3))
    assert not res.problems
    faces = res.faces
    assert [f.image for f in faces] == [*range(8), 8, 8, 9]
    composite = [f for f in faces if f.image == 8]
    assert composite[0].cluster != composite[1].cluster or composite[0].cluster < 0
    assert res.refused >= 1  # the constraint did work: the two are the same person
    photos = np.array([f.image for f in faces])
    labels = np.array([f.cluster for f in faces])
    assert cannot_link_violations(labels, photos) == 0
    # without the constraint the two faces of the composite photo do end up together
    emb = np.stack([f.embedding for f in faces])
    plain = cluster_embeddings(emb, res.threshold.value, None, ClusterOptions()).labels
    assert plain[8] == plain[9] >= 0
    # the other people cluster by person (dlib at FAR 1e-3)
    for i in range(8):
        for j in range(8):
            assert (labels[i] == labels[j] >= 0) == (truth[i] == truth[j]), (i, j)
    d = res.to_dict()
    assert d["threshold"]["far"] == 1e-3 and len(d["faces"]) == 11
    listed = [i for c in d["clusters"] for i in c["faces"]] + d["unclustered"]
    assert sorted(listed) == list(range(11))


def _copy(photos: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())


def _clusters_by_photo(pc: PhotoCollection) -> dict[str, int]:
    return {Path(r.photo).name: r.cluster for r in pc.state.faces()}


def test_incremental_runs_keep_decisions(recognizer, people, tmp_path):
    names = list(people)
    folder, out = tmp_path / "photos", tmp_path / "out"
    _copy([people[n][k] for n in names[:4] for k in (0, 1)], folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    pc = PhotoCollection(out, recognizer, options=ClusterOptions(far=1e-3))
    first = pc.update_folder(folder)
    assert first.photos_new == 9 and first.faces_new == 8
    assert [p.photo for p in first.problems] == ["broken.jpg"]
    assert first.problems[0].problem == "unreadable"
    assert first.new_clusters == 4 and first.clusters == 4 and first.unclustered == 0
    where = _clusters_by_photo(pc)
    c = {n: where[people[n][0].name] for n in names[:4]}
    assert all(where[people[n][1].name] == c[n] for n in names[:4])

    # the user's decisions: name one, split another, move a face out and merge it back
    p0, p1, p2, p3 = names[:4]
    pc.name(c[p0], "First Person")
    face_of = {Path(r.photo).name: r.id for r in pc.state.faces()}
    split_off = pc.split(c[p1], [face_of[people[p1][1].name]])
    alone = pc.move([face_of[people[p2][1].name]])
    assert alone not in c.values() and _clusters_by_photo(pc)[people[p2][1].name] == alone
    pc.merge(c[p2], alone)
    with pytest.raises(ValueError, match="already named"):
        pc.name(c[p1], "First Person")

    # second run: the third photo of each, and a new person with two photos
    _copy([people[n][2] for n in names[:4]] + people[names[4]][:2], folder)
    second = pc.update_folder(folder)
    assert second.photos_seen == 15 and second.photos_new == 6 and second.faces_new == 6
    assert second.assigned == 4 and second.new_clusters == 1
    where = _clusters_by_photo(pc)
    assert where[people[p0][2].name] == c[p0]
    assert pc.state.cluster_names()[c[p0]] == "First Person"
    assert where[people[p1][2].name] in (c[p1], split_off)
    assert where[people[p1][1].name] == split_off != where[people[p1][0].name] == c[p1]
    assert where[people[p2][2].name] == where[people[p2][1].name] == c[p2]
    assert where[people[p3][2].name] == c[p3]
    assert where[people[names[4]][0].name] == where[people[names[4]][1].name]
    assert [k for k, _ in pc.state.decisions()] == ["name", "split", "move", "merge"]

    # a third run with nothing new embeds nothing
    third = pc.update_folder(folder)
    assert third.photos_new == 0 and third.faces_new == 0 and third.problems == ()
    assert [p.problem for p in pc.state.photos() if p.problem] == ["unreadable"]

    # exports: every face in faces.csv, a contact sheet per cluster, singletons apart
    rows = list(csv.DictReader((out / "faces.csv").open()))
    assert len(rows) == 14
    by_cluster: dict[str, list[dict]] = {}
    for r in rows:
        by_cluster.setdefault(r["cluster"], []).append(r)
    for cid, members in by_cluster.items():
        big = len(members) >= 2 or members[0]["person"]
        assert all(m["clustered"] == str(int(bool(big))) for m in members)
        if big:
            sheet = [s for s in (out / "contact_sheets").iterdir()
                     if s.name.startswith(f"{int(cid):05d}")]
            assert len(sheet) == 1 and Image.open(sheet[0]).size[0] > 0
    assert len(list((out / "unclustered").iterdir())) == sum(
        1 for r in rows if r["clustered"] == "0")
    assert (out / "clusters" / f"{c[p2]:05d}").is_dir()
    named = [d for d in (out / "clusters").iterdir() if d.name.endswith("First_Person")]
    assert len(named) == 1 and len(list(named[0].iterdir())) == 3
    pc.close()


def test_another_model_is_refused(recognizer, people, tmp_path):
    import torch

    from facemetric.inference import ModelContract, TorchEncoder
    from facemetric.recognizer import Recognizer

    folder, out = tmp_path / "photos", tmp_path / "out"
    _copy(people[next(iter(people))][:1], folder)
    PhotoCollection(out, recognizer).update_folder(folder)
    contract = ModelContract(backbone="flat", input_size=8, template="arcface112",
                             embedding_size=4, weights_sha256="other")
    other = TorchEncoder(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)),
                         contract, channels_last=False)
    table = ThresholdTable(contract.fingerprint(), (CalibrationEntry(1e-3, 0.5, 1, 1000),),
                           "test", 1000, 0)
    with pytest.raises(ValueError, match="another model"):
        PhotoCollection(out, Recognizer(other, thresholds=table)).update_folder(folder)


def test_cli_end_to_end(recognizer, people, tmp_path, capsys):
    import json

    from facemetric.cli import main
    from facemetric.gallery import SQLiteGallery

    names = list(people)
    folder, out = tmp_path / "photos", tmp_path / "out"
    _copy([people[n][k] for n in names[:3] for k in (0, 1, 2)], folder)
    (folder / "notes.txt").write_text("not a photo")  # ignored: not an image file
    table = tmp_path / "dlib_thresholds.json"
    recognizer.thresholds.save(table)
    assert main(["cluster", str(folder), "--out", str(out), "--model", "dlib",
                 "--thresholds", str(table), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["photos_new"] == 9 and report["clusters"] == 3 and report["far"] == 1e-3
    rows = list(csv.DictReader((out / "faces.csv").open()))
    cid = int(next(r["cluster"] for r in rows if r["photo"] == people[names[0]][0].name))
    gallery = tmp_path / "g.sqlite"
    assert main(["cluster", "name", str(out), str(cid), "Somebody", "--gallery",
                 str(gallery)]) == 0
    assert "enrolled 3 faces" in capsys.readouterr().out
    with SQLiteGallery(gallery) as g:
        assert [p.name for p in g.list_persons("default")[0]] == ["Somebody"]
        assert len(g.faces("default", "Somebody")) == 3
    assert main(["cluster", "list", str(out)]) == 0
    assert "Somebody" in capsys.readouterr().out
    other = int(next(r["cluster"] for r in rows if r["photo"] == people[names[1]][0].name))
    assert main(["cluster", "merge", str(out), str(cid), str(cid)]) == 2
    assert "itself" in capsys.readouterr().err
    assert main(["cluster", "merge", str(out), str(cid), str(other)]) == 0
    assert main(["cluster", "split", str(out), str(cid), "99999"]) == 2
    assert "not in cluster" in capsys.readouterr().err
    assert main(["cluster", "list", str(tmp_path / "nowhere")]) == 2
    assert "no clustering state" in capsys.readouterr().err
