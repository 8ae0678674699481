"""insightface's RecordIO training files, read without MXNet: files written here by hand
(an independent byte-level writer following dmlc-core's layout) and by
``write_record_file`` decode to the images and labels that went in, including records that
MXNet splits at an aligned magic number; damage is reported, and training reads a ``.rec``."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facemetric.data.recordio import (
    MAGIC,
    RecordDataset,
    RecordIOError,
    read_index,
    read_record,
    unpack_payload,
    write_record_file,
)


def _frame(payload: bytes) -> bytes:
    """dmlc-core framing, written out longhand: split at aligned magics, pad to 4 bytes."""
    magic = struct.pack("<I", MAGIC)
    parts, start, i = [], 0, 0
    while i + 4 <= len(payload):
        if payload[i:i + 4] == magic:
            parts.append(payload[start:i])
            start = i + 4
        i += 4
    parts.append(payload[start:])
    out = b""
    for n, part in enumerate(parts):
        if len(parts) == 1:
            flag = 0
        elif n == 0:
            flag = 1
        elif n == len(parts) - 1:
            flag = 3
        else:
            flag = 2
        out += struct.pack("<I", MAGIC) + struct.pack("<I", (flag << 29) + len(part)) + part
        while len(out) % 4:
            out += b"\x00"
    return out


def _hand_written(path: Path, images: list[bytes], labels: list[float],
                  header: bool = True, multi_label: bool = False) -> None:
    body, lines = b"", []
    if header:
        payload = struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack(
            "<ff", len(images) + 1, len(images) + 1)
        lines.append(f"0\t{len(body)}")
        body += _frame(payload)
    for n, (image, label) in enumerate(zip(images, labels, strict=True)):
        key = n + 1 if header else n + 10
        if multi_label:  # flag 2: the identity first, then an extra value
            payload = struct.pack("<IfQQ", 2, 0.0, key, 0) + struct.pack("<ff", label, 7.5)
        else:
            payload = struct.pack("<IfQQ", 0, label, key, 0)
        lines.append(f"{key}\t{len(body)}")
        body += _frame(payload + image)
    path.write_bytes(body)
    path.with_suffix(".idx").write_text("\n".join(lines) + "\n")


def _jpeg(seed: int, side: int = 24) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("header", [True, False])
@pytest.mark.parametrize("multi_label", [False, True])
def test_hand_written_file_decodes_to_its_images_and_labels(tmp_path, header, multi_label):
    pics = [_jpeg(s) for s in range(7)]
    labels = [0, 0, 1, 2, 2, 2, 1]
    rec = tmp_path / "train.rec"
    _hand_written(rec, [p for p, _ in pics], [float(v) for v in labels], header, multi_label)
    ds = RecordDataset(rec)
    assert len(ds) == 7 and ds.num_classes == 3
    assert ds.targets.tolist() == labels
    assert ds.class_counts.tolist() == [2, 2, 3]
    for i, (_, decoded) in enumerate(pics):
        image, label = ds[i]
        assert label == labels[i] and image.dtype == np.uint8
        np.testing.assert_array_equal(image, decoded)


def test_a_payload_holding_the_magic_is_split_and_rejoined(tmp_path):
    magic = struct.pack("<I", MAGIC)
    # header (24 bytes) + 4 bytes, then the magic at offsets 28 and 40 of the payload:
    # aligned, so MXNet's writer stores this record in three parts
    image = b"abcd" + magic + b"12345678" + magic + b"tail!"
    rec = tmp_path / "x.rec"
    _hand_written(rec, [image], [0.0], header=False)
    raw = rec.read_bytes()
    flags = [struct.unpack_from("<I", raw, off + 4)[0] >> 29 for off in (0, 36, 52)]
    assert flags == [1, 2, 3]  # the hand framing did split it
    with open(rec, "rb") as handle:
        labels, data = unpack_payload(read_record(handle, 0))
    assert data == image and labels.tolist() == [0.0]
    # the library's writer frames it the same way, byte for byte
    write_record_file([(image, 0)], tmp_path / "y.rec")
    ours = (tmp_path / "y.rec").read_bytes()
    header_len = int(read_index(tmp_path / "y.idx")[1])
    payload_frame = _frame(struct.pack("<IfQQ", 0, 0.0, 1, 0) + image)
    assert ours[header_len:] == payload_frame


def test_write_then_read_real_faces(tmp_path, orl_root):
    """An ORL folder packed into one file and read back image for image."""
    folders = sorted(p for p in orl_root.iterdir() if p.is_dir())[:3]
    items, expected = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.iterdir())[:4]:
            data = path.read_bytes()
            items.append((data, label))
            expected.append((np.asarray(Image.open(path).convert("RGB")), label))
    rec, n = write_record_file(iter(items), tmp_path / "orl.rec")
    assert n == 12 and not list(tmp_path.glob(".tmp-*"))
    ds = RecordDataset(rec)
    assert ds.targets.tolist() == [lab for _, lab in expected]
    for i, (image, label) in enumerate(expected):
        got, got_label = ds[i]
        np.testing.assert_array_equal(got, image)
        assert got_label == label
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives
    np.testing.assert_array_equal(clone[5][0], expected[5][0])


def test_damage_and_misuse_are_reported(tmp_path):
    pics = [_jpeg(s)[0] for s in range(3)]
    rec = tmp_path / "t.rec"
    _hand_written(rec, pics, [0.0, 1.0, 1.0])
    with pytest.raises(FileNotFoundError, match=r"\.idx beside it"):
        RecordDataset(tmp_path / "none.rec")
    # an index pointing into the middle of a record
    good = rec.with_suffix(".idx").read_text()
    rec.with_suffix(".idx").write_text(good.replace("\t", "\t1", 2).replace("\t1", "\t", 1))
    with pytest.raises(RecordIOError, match="magic"):
        RecordDataset(rec)
    rec.with_suffix(".idx").write_text("0\tzero\n")
    with pytest.raises(RecordIOError, match="key<TAB>offset"):
        RecordDataset(rec)
    # a truncated file
    rec.with_suffix(".idx").write_text(good)
    rec.write_bytes(rec.read_bytes()[:-10])
    with pytest.raises(RecordIOError, match="truncated"):
        RecordDataset(rec)
    # labels with a gap: class 1 has no image
    _hand_written(rec, pics, [0.0, 2.0, 2.0])
    with pytest.raises(RecordIOError, match="no image has label 1"):
        RecordDataset(rec)
    _hand_written(rec, pics, [0.0, 1.5, 1.0])
    with pytest.raises(RecordIOError, match="not a class index"):
        RecordDataset(rec)
    with pytest.raises(ValueError, match=r"ends in \.rec"):
        write_record_file([(pics[0], 0)], tmp_path / "a.bin")
    with pytest.raises(ValueError, match="no items"):
        write_record_file([], tmp_path / "empty.rec")
    assert not (tmp_path / "empty.rec").exists()


def test_training_reads_a_record_file(tmp_path):
    from facemetric.training import config_from_dict, train

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    items = []
    for label in range(4):
        base = rng.integers(0, 256, (4, 4, 3))
        for _ in range(4):
            img = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 10, (32, 32, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            items.append((buf.getvalue(), label))
    rec, _ = write_record_file(items, tmp_path / "train.rec")
    raw = {
        "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"root": str(rec), "image_size": 32},
        "model": {"name": "small_cnn", "embedding_size": 8, "options": {"width": 8}},
        "loss": {"name": "arcface", "scale": 16.0, "margin": 0.2},
        "batch": {"size": 8},
        "train": {"max_steps": 3, "checkpoint_every": 3, "log_every": 1},
    }
    result = train(config_from_dict(raw), progress=False)
    assert result.steps == 3 and all(np.isfinite(result.losses))
    bad = dict(raw, output_dir=str(tmp_path / "run2"),
               data={**raw["data"], "min_images": 2})
    with pytest.raises(ValueError, match="RecordIO file"):
        train(config_from_dict(bad), progress=False)
