"""Protocol readers on the real LFW/CFP files, on small synthetic files, and the safe .bin
loader against malicious pickles."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from facemetric.evaluation import (
    PairList,
    load_verification_bin,
    read_cfp_pairs,
    read_lfw_pairs,
)

# ------------------------------------------------------------------ real LFW / CFP


def test_lfw_view2_pairs(lfw_root: Path):
    images = lfw_root / "lfw-deepfunneled"
    pairs = read_lfw_pairs(lfw_root / "pairs.txt", images)
    assert len(pairs) == 6000
    np.testing.assert_array_equal(np.bincount(pairs.fold), [600] * 10)
    for f in range(10):
        block = slice(600 * f, 600 * (f + 1))  # contiguous blocks
        np.testing.assert_array_equal(pairs.fold[block], f)
        np.testing.assert_array_equal(pairs.is_same[block], np.r_[[True] * 300, [False] * 300])
    # first matched line "Abel_Pacheco 1 4"; first mismatched line (line 302)
    # "Abdel_Madi_Shabneh 1 Dean_Barker 1"
    assert pairs.path_a[0] == images / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg"
    assert pairs.path_b[0] == images / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg"
    assert pairs.path_a[300] == images / "Abdel_Madi_Shabneh" / "Abdel_Madi_Shabneh_0001.jpg"
    assert pairs.path_b[300] == images / "Dean_Barker" / "Dean_Barker_0001.jpg"
    person_a = [p.parent.name for p in pairs.path_a]
    person_b = [p.parent.name for p in pairs.path_b]
    np.testing.assert_array_equal(np.array(person_a) == np.array(person_b), pairs.is_same)
    assert pairs.missing_images() == []
    with pytest.raises(ValueError):
        pairs.is_same[0] = False  # read-only


@pytest.mark.parametrize(
    ("name", "per_class"), [("pairsDevTest.txt", 500), ("pairsDevTrain.txt", 1100)]
)
def test_lfw_view1_pairs(lfw_root: Path, name: str, per_class: int):
    pairs = read_lfw_pairs(lfw_root / name, lfw_root / "lfw-deepfunneled")
    assert len(pairs) == 2 * per_class
    np.testing.assert_array_equal(pairs.is_same, np.r_[[True] * per_class, [False] * per_class])
    np.testing.assert_array_equal(pairs.fold, np.arange(2 * per_class) % 10)
    for f in range(10):  # interleaving keeps both classes in every fold
        assert pairs.is_same[pairs.fold == f].sum() == per_class // 10
    assert pairs.missing_images() == []


def test_lfw_dev_sets_are_disjoint(lfw_root: Path):
    train = read_lfw_pairs(lfw_root / "pairsDevTrain.txt", lfw_root / "lfw-deepfunneled")
    test = read_lfw_pairs(lfw_root / "pairsDevTest.txt", lfw_root / "lfw-deepfunneled")
    people = [{p.parent.name for p in pl.unique_images()[0]} for pl in (train, test)]
    assert not people[0] & people[1]


@pytest.mark.parametrize("protocol", ["FF", "FP"])
def test_cfp_pairs(cfp_root: Path, protocol: str):
    pairs = read_cfp_pairs(cfp_root, protocol)
    assert len(pairs) == 7000
    data = cfp_root / "Data" / "Images"
    for f in range(10):
        block = slice(700 * f, 700 * (f + 1))
        np.testing.assert_array_equal(pairs.fold[block], f)
        np.testing.assert_array_equal(pairs.is_same[block], np.r_[[True] * 350, [False] * 350])
    assert all(p.parent.name == "frontal" for p in pairs.path_a)
    second = "frontal" if protocol == "FF" else "profile"
    assert all(p.parent.name == second for p in pairs.path_b)
    # same pairs share the person folder, diff pairs do not
    person_a = np.array([p.parent.parent.name for p in pairs.path_a])
    person_b = np.array([p.parent.parent.name for p in pairs.path_b])
    np.testing.assert_array_equal(person_a == person_b, pairs.is_same)
    if protocol == "FP":  # Split/FP/01/same.txt starts "5,1"
        assert pairs.path_a[0] == data / "001" / "frontal" / "05.jpg"
        assert pairs.path_b[0] == data / "001" / "profile" / "01.jpg"
    else:  # Split/FF/01/same.txt starts "4,7"
        assert pairs.path_a[0] == data / "001" / "frontal" / "04.jpg"
        assert pairs.path_b[0] == data / "001" / "frontal" / "07.jpg"
    assert pairs.missing_images() == []


# ------------------------------------------------------------------ synthetic files


def test_view2_and_view1_synthetic(tmp_path: Path):
    v2 = tmp_path / "v2.txt"
    v2.write_text("2\t1\nAnn\t1\t2\nAnn\t1\tBob\t3\nCid\t2\t4\nBob\t1\tCid\t1\n")
    pairs = read_lfw_pairs(v2, tmp_path)
    assert pairs.is_same.tolist() == [True, False, True, False]
    assert pairs.fold.tolist() == [0, 0, 1, 1]
    assert pairs.path_b[1] == tmp_path / "Bob" / "Bob_0003.jpg"
    v1 = tmp_path / "v1.txt"
    v1.write_text("3\nAnn 1 2\nBob 1 2\nCid 1 3\nAnn 1 Bob 1\nBob 2 Cid 1\nCid 2 Ann 2\n")
    pairs = read_lfw_pairs(v1, tmp_path, num_folds=2)
    assert pairs.is_same.tolist() == [True] * 3 + [False] * 3
    assert pairs.fold.tolist() == [0, 1, 0, 1, 0, 1]
    images, ia, ib = pairs.unique_images()
    assert len(images) == len(set(pairs.path_a) | set(pairs.path_b)) == 7
    assert [images[i] for i in ia] == list(pairs.path_a)
    assert [images[i] for i in ib] == list(pairs.path_b)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2\nAnn 1 2\nAnn 1 Bob 1\n", "announces 4 pairs"),
        ("1\nAnn 1 Bob 1\nAnn 1 2\n", "expected a matched"),
        ("1 2\nAnn 1 2\nAnn 1 Bob 1\nAnn 1 3\nBob 1 Ann 1\n", "expected a matched"),
        ("x\nAnn 1 2\n", "header"),
        ("1\nAnn 0 2\nAnn 1 Bob 1\n", "positive integer"),
        ("1\n.. 1 2\nAnn 1 Bob 1\n", "cannot be a path"),
    ],
)
def test_malformed_lfw_files_raise(tmp_path: Path, text: str, message: str):
    f = tmp_path / "pairs.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_lfw_pairs(f, tmp_path)


def test_pairlist_checks_lengths():
    with pytest.raises(ValueError):
        PairList((Path("a"),), (), np.array([True]), np.array([0]))


# ------------------------------------------------------------------ .bin loading


def write(tmp_path: Path, obj: object, protocol: int) -> Path:
    path = tmp_path / f"set{protocol}.bin"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bin_plain_lists(tmp_path: Path, protocol: int):
    images = [bytes([i]) * 5 for i in range(40)]
    same = [i % 3 == 0 for i in range(20)]
    loaded = load_verification_bin(write(tmp_path, (images, same), protocol))
    assert loaded.images == tuple(images) and len(loaded) == 20
    assert loaded.is_same.tolist() == same
    assert loaded.fold.tolist() == [i // 2 for i in range(20)]  # 10 contiguous blocks


@pytest.mark.parametrize("protocol", [2, 5])
def test_bin_numpy_bool_and_uint8_arrays_are_admitted(tmp_path: Path, protocol: int):
    images = [np.frombuffer(bytes([i]) * 4, dtype=np.uint8) for i in range(20)]
    same = np.array([True, False] * 5)
    loaded = load_verification_bin(write(tmp_path, (images, same), protocol))
    assert loaded.images[3] == bytes([3]) * 4
    np.testing.assert_array_equal(loaded.is_same, same)


@pytest.mark.parametrize(
    "bad",
    [
        np.arange(10, dtype=np.float64),  # not bool/uint8
        np.array([True, "x"] * 5, dtype=object),  # object arrays could hold anything
        np.ma.masked_array([True] * 10),  # an ndarray subclass from another module
    ],
)
def test_bin_refuses_other_numpy_objects(tmp_path: Path, bad):
    path = write(tmp_path, ([b"x"] * 20, bad), 2)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load_verification_bin(path)


def test_bin_refuses_direct_ndarray_call(tmp_path: Path):
    # GLOBAL numpy.ndarray; REDUCE with ((3,),): would allocate an array if admitted.
    path = tmp_path / "direct.bin"
    path.write_bytes(b"\x80\x02cnumpy\nndarray\nK\x03\x85\x85R.")
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load_verification_bin(path)


def test_bin_refuses_setting_state_on_loader_stand_ins(tmp_path: Path):
    # GLOBAL numpy.dtype, then BUILD with {"a": 1}: would set an attribute on the stand-in.
    path = tmp_path / "build.bin"
    path.write_bytes(b"\x80\x02cnumpy\ndtype\n}(X\x01\x00\x00\x00aK\x01ub.")
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load_verification_bin(path)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_raises_and_does_not_run(tmp_path: Path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(([b"a", b"b"], [_Payload(marker)]), protocol=2)
    # The payload is live: plain pickle runs it.
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.bin"
    path.write_bytes(data)
    with pytest.raises(pickle.UnpicklingError, match="refused to load global"):
        load_verification_bin(path)
    assert not marker.exists()
    # the same through builtins.exec / eval
    for func in (exec, eval):
        path.write_bytes(pickle.dumps(([b"a", b"b"], [_Call(func, "1")]), protocol=4))
        with pytest.raises(pickle.UnpicklingError, match="builtins"):
            load_verification_bin(path)


class _Call:
    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def test_bin_structure_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="two per pair"):
        load_verification_bin(write(tmp_path, ([b"x"] * 21, [True] * 10), 4))
    with pytest.raises(ValueError, match="expected bytes"):
        load_verification_bin(write(tmp_path, (["text"] * 20, [True] * 10), 4))
    with pytest.raises(ValueError, match="list of bools"):
        load_verification_bin(write(tmp_path, ([b"x"] * 20, [0.5] * 10), 4))
    with pytest.raises(ValueError, match="pickled"):
        load_verification_bin(write(tmp_path, {"images": []}, 4))


def test_with_existing_images_finds_the_aligned_copy_under_another_suffix(tmp_path):
    from facemetric.evaluation import with_existing_images

    (tmp_path / "Ann").mkdir()
    (tmp_path / "Ann" / "Ann_0001.png").write_bytes(b"png")  # aligned as PNG
    (tmp_path / "Ann" / "Ann_0002.jpg").write_bytes(b"jpg")  # kept as named
    (tmp_path / "pairs.txt").write_text("1\nAnn\t1\t2\nAnn\t1\tBob\t1\n")
    pairs = with_existing_images(read_lfw_pairs(tmp_path / "pairs.txt", tmp_path, 1))
    assert pairs.path_a == (tmp_path / "Ann" / "Ann_0001.png",) * 2
    assert pairs.path_b == (tmp_path / "Ann" / "Ann_0002.jpg",
                            tmp_path / "Bob" / "Bob_0001.jpg")  # missing: left as named
    assert pairs.is_same.tolist() == [True, False] and pairs.missing_images() == [
        tmp_path / "Bob" / "Bob_0001.jpg"]
