"""IdentityFolder and read_people_file on small trees in tmp_path and on real ORL / LFW."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from facemetric.data.folders import IdentityFolder, LoadFailure, read_people_file
from facemetric.data.images import load_image


def _img(path: Path, value: int, size: tuple[int, int] = (6, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def _broken(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    _img(root / "bob" / "1.png", 10)
    _img(root / "bob" / "2.png", 20)
    _img(root / "alice" / "10.jpg", 30)
    _img(root / "alice" / "2.jpg", 40)
    _img(root / "alice" / "1.JPG", 50)
    _img(root / "carol" / "a.bmp", 60)
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "alice" / "Thumbs.db").write_bytes(b"\0" * 10)
    _img(root / "bob" / ".hidden.png", 70)
    (root / "empty").mkdir()
    (root / ".git").mkdir()
    _img(root / ".git" / "x.png", 80)
    _img(root / "stray.png", 90)  # a file at the top level is not an identity
    return root


def test_scans_identities_labels_and_counts(tree: Path) -> None:
    ds = IdentityFolder(tree)
    assert ds.classes == ["alice", "bob", "carol"]
    assert ds.class_to_idx == {"alice": 0, "bob": 1, "carol": 2}
    assert len(ds) == 6 and ds.num_classes == 3
    names = [(p.parent.name, p.name) for p, _ in ds.samples]
    # natural order inside an identity; upper-case extensions count; junk is ignored
    assert names == [
        ("alice", "1.JPG"),
        ("alice", "2.jpg"),
        ("alice", "10.jpg"),
        ("bob", "1.png"),
        ("bob", "2.png"),
        ("carol", "a.bmp"),
    ]
    assert ds.targets.dtype == np.int64
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 2]
    assert ds.class_counts.tolist() == [3, 2, 1]
    assert [y for _, y in ds.samples] == ds.targets.tolist()


def test_getitem_default_tensor_and_transform(tree: Path) -> None:
    ds = IdentityFolder(tree)
    x, y = ds[3]
    assert y == 1
    assert x.dtype == torch.float32 and x.shape == (3, 5, 6)
    expected = torch.from_numpy(load_image(tree / "bob" / "1.png")).permute(2, 0, 1) / 255.0
    assert torch.equal(x, expected)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(ds[-3][0], x)
    with pytest.raises(IndexError):
        ds[6]

    seen: list[tuple[int, ...]] = []

    def transform(arr: np.ndarray) -> str:
        seen.append(arr.shape)
        assert arr.dtype == np.uint8
        return "ok"

    assert IdentityFolder(tree, transform=transform)[0] == ("ok", 0)
    assert seen == [(5, 6, 3)]


def test_min_images_relabels_contiguously(tree: Path) -> None:
    ds = IdentityFolder(tree, min_images=2)
    assert ds.classes == ["alice", "bob"]
    assert ds.targets.tolist() == [0, 0, 0, 1, 1]
    assert IdentityFolder(tree, min_images=3).classes == ["alice"]
    with pytest.raises(ValueError, match="min_images"):
        IdentityFolder(tree, min_images=0)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        IdentityFolder(tmp_path / "nowhere")


# ---------------------------------------------------------------- list files


def test_flat_people_file_selects_identities(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    listing = tree.parent / "people.txt"
    listing.write_text("2\ncarol\t1\nbob\t2\n")
    with caplog.at_level(logging.WARNING):
        ds = IdentityFolder(tree, people_file=listing)
    assert ds.classes == ["bob", "carol"]
    assert ds.class_counts.tolist() == [2, 1]
    assert not caplog.records

    listing.write_text("2\ncarol\t1\nbob\t5\n")
    with caplog.at_level(logging.WARNING):
        IdentityFolder(tree, people_file=listing)
    assert "bob: listed 5, found 2" in caplog.text


def test_people_file_naming_a_missing_identity(tree: Path) -> None:
    listing = tree.parent / "people.txt"
    listing.write_text("2\nbob\t2\ndave\t3\n")
    with pytest.raises(ValueError, match="dave"):
        IdentityFolder(tree, people_file=listing)


def test_view2_people_file_with_folds(tree: Path) -> None:
    listing = tree.parent / "people_v2.txt"
    listing.write_text("2\n1\nalice\t3\n\n2\nbob\t2\ncarol\t1\n")
    assert read_people_file(listing) == [[("alice", 3)], [("bob", 2), ("carol", 1)]]
    assert IdentityFolder(tree, people_file=listing).classes == ["alice", "bob", "carol"]
    held_in = IdentityFolder(tree, people_file=listing, folds=[1])
    assert held_in.classes == ["bob", "carol"]
    assert held_in.targets.tolist() == [0, 0, 1]
    assert IdentityFolder(tree, people_file=listing, folds=[0]).classes == ["alice"]
    with pytest.raises(ValueError, match="fold 2 does not exist"):
        IdentityFolder(tree, people_file=listing, folds=[2])
    with pytest.raises(ValueError, match="people_file"):
        IdentityFolder(tree, folds=[0])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("3\nbob\t2\n", "announces 3 people but 1"),
        ("bob\t2\n", "expected a count line"),
        ("1\nbob\tmany\n", "expected 'Name count'"),
        ("2\n1\nbob\t2\n", "announces 2 folds"),
        ("1\n3\nbob\t2\n", "runs past the end"),
        ("1\n1\nbob\t2\ncarol\t1\n", "unexpected lines"),
        ("2\nbob\t2\nbob\t1\n", "more than once"),
    ],
)
def test_malformed_people_files(tmp_path: Path, text: str, match: str) -> None:
    listing = tmp_path / "p.txt"
    listing.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_people_file(listing)


# ---------------------------------------------------------------- broken images


def test_broken_image_is_replaced_by_same_identity(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _broken(tree / "alice" / "5.jpg")
    ds = IdentityFolder(tree)
    index = next(i for i, (p, _) in enumerate(ds.samples) if p == bad)
    assert ds.samples[index][1] == 0
    with caplog.at_level(logging.WARNING):
        x, y = ds[index]
    assert y == 0  # same identity: the label stays right for a P×K batch
    assert isinstance(x, torch.Tensor) and x.shape == (3, 5, 6)
    assert len(ds.failures) == 1
    failure = ds.failures[0]
    assert isinstance(failure, LoadFailure) and failure.path == bad and failure.reason
    assert str(bad) in caplog.text
    # it was really another alice image that came back
    alice = [torch.from_numpy(load_image(p)).permute(2, 0, 1) / 255.0 for p, y in ds.samples
             if y == 0 and p != bad]
    assert any(torch.equal(x, a) for a in alice)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ds[index]
    assert len(ds.failures) == 1  # recorded once
    assert "skipping unreadable" not in caplog.text


def test_identity_with_only_broken_images_falls_back(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _broken(tree / "dave" / "1.jpg")
    _broken(tree / "dave" / "2.jpg")
    ds = IdentityFolder(tree)
    index = ds.targets.tolist().index(ds.class_to_idx["dave"])
    with caplog.at_level(logging.WARNING):
        _, y = ds[index]
    assert y != ds.class_to_idx["dave"]
    assert "no readable image of that identity" in caplog.text
    assert {f.path.name for f in ds.failures} == {"1.jpg", "2.jpg"}


def test_epoch_with_broken_images_never_crashes(tree: Path) -> None:
    _broken(tree / "alice" / "7.jpg")
    (tree / "bob" / "3.png").write_bytes(b"")
    ds = IdentityFolder(tree)
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == ds.targets.tolist()  # every index served, labels kept
    assert sorted(f.path.name for f in ds.failures) == ["3.png", "7.jpg"]


def test_all_images_broken_raises(tmp_path: Path) -> None:
    _broken(tmp_path / "r" / "a" / "1.jpg")
    ds = IdentityFolder(tmp_path / "r")
    with pytest.raises(RuntimeError, match="no image"):
        ds[0]


@pytest.mark.parametrize("workers", [1, 3])
def test_verify_finds_and_drops_broken_files(tree: Path, workers: int) -> None:
    _broken(tree / "alice" / "7.jpg")
    (tree / "carol" / "b.png").write_text("text")
    _broken(tree / "dave" / "1.jpg")
    ds = IdentityFolder(tree)
    assert len(ds) == 9 and ds.num_classes == 4
    found = ds.verify(workers=workers)
    assert sorted(f.path.name for f in found) == ["1.jpg", "7.jpg", "b.png"]
    assert all(f.reason for f in found)
    assert set(ds.failures) == set(found)
    assert ds.classes == ["alice", "bob", "carol"]  # dave had no good image left
    assert len(ds) == 6
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 2]
    assert ds.class_counts.tolist() == [3, 2, 1]
    assert ds.verify() == []  # nothing new


def test_verify_keep_and_min_images(tree: Path) -> None:
    _broken(tree / "bob" / "9.png")
    ds = IdentityFolder(tree, min_images=3)
    assert ds.classes == ["alice", "bob"]
    assert len(ds.verify(drop=False)) == 1 and len(ds) == 6
    ds.verify()
    assert ds.classes == ["alice"]  # bob has 2 good images now, below min_images


# ---------------------------------------------------------------- real data


def test_real_orl(orl_root: Path) -> None:
    ds = IdentityFolder(orl_root)
    assert ds.num_classes == 40
    assert len(ds) == 400
    assert ds.class_counts.tolist() == [10] * 40
    assert ds.classes[:3] == ["s1", "s10", "s11"]
    assert [p.name for p, _ in ds.samples[:10]] == [f"{k}.pgm" for k in range(1, 11)]
    x, y = ds[15]
    assert y == 1 and x.shape == (3, 112, 92)
    assert torch.equal(x[0], x[1])  # grayscale replicated


def test_real_lfw_dev_split(lfw_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = lfw_root / "lfw-deepfunneled"
    with caplog.at_level(logging.WARNING):
        train = IdentityFolder(images, people_file=lfw_root / "peopleDevTrain.txt")
    assert not caplog.records  # every listed count matches the folders
    assert train.num_classes == 4038
    assert len(train) == 9525
    assert int(train.class_counts.sum()) == 9525
    test = IdentityFolder(images, people_file=lfw_root / "peopleDevTest.txt")
    assert test.num_classes == 1711
    assert not set(train.classes) & set(test.classes)
    x, y = train[len(train) - 1]
    assert y == train.num_classes - 1 and x.shape == (3, 250, 250)
    several = IdentityFolder(images, people_file=lfw_root / "peopleDevTrain.txt", min_images=2)
    assert several.class_counts.min() >= 2
    assert several.num_classes < train.num_classes


def test_real_lfw_view2_folds(lfw_root: Path) -> None:
    folds = read_people_file(lfw_root / "people.txt")
    assert len(folds) == 10
    assert len(folds[0]) == 601
    one = IdentityFolder(lfw_root / "lfw-deepfunneled", lfw_root / "people.txt", folds=[0])
    assert one.num_classes == 601
    assert int(one.class_counts.sum()) == sum(c for _, c in folds[0])
