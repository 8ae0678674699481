"""insightface's training-set format: an MXNet RecordIO file (``train.rec``) with its index
(``train.idx``), read without MXNet.

MS1MV2, MS1MV3, Glint360K and WebFace are distributed this way. The layout, as MXNet's
``recordio`` / dmlc-core writes it and insightface's ``MXFaceDataset`` reads it:

- **Index** ``train.idx``: one line per record, ``key<TAB>byte offset`` of the record in
  ``train.rec``.
- **Record** (little-endian): ``uint32 magic = 0xCED7230A``, ``uint32 lrec`` with the part
  flag ``cflag = lrec >> 29`` and the part length ``lrec & (2**29 − 1)``, the part's bytes,
  zero padding to a multiple of 4. A payload that contains the magic number at a 4-byte
  aligned position is stored in parts, cut at each such occurrence (the magic itself not
  stored): ``cflag`` 0 = whole record, 1 = first part, 2 = middle, 3 = last; a reader
  rejoins the parts with the magic between them.
- **Payload**: the ``IRHeader`` struct ``<IfQQ`` — ``flag`` (uint32), ``label`` (float32),
  ``id``, ``id2`` (uint64) — then, when ``flag > 0``, ``flag`` float32 labels (the first is
  the identity), then the encoded image (JPEG or PNG).
- **Header record** (key 0, insightface's convention): ``flag > 0`` and labels
  ``(first_key_after_the_images, …)``: images are keys ``1 .. labels[0] − 1``; the keys
  after them describe identity ranges and are not images. Without that header record (or
  when key 0 is an image) every key of the index is an image.

:class:`RecordDataset` yields ``(image, label)`` like
:class:`~facemetric.data.folders.IdentityFolder` (an ``(H, W, 3)`` uint8 RGB array through
``transform``) with ``targets``, ``num_classes`` and ``class_counts``, so the training loop
takes it where it takes a folder (``[data] root = "…/train.rec"``). Labels must be the
integers ``0 .. C − 1`` (insightface's are). Reading the labels costs one 32-byte read per
image (seek + read; about 5.8 M for MS1MV2), done once at construction. The file is opened
lazily in each process, so DataLoader workers each hold their own handle.

:func:`write_record_file` writes the same format from ``(encoded image, label)`` items, e.g.
to pack an aligned folder into one file for faster reading.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from facemetric.atomic import atomic_write

MAGIC = 0xCED7230A
"""dmlc-core's RecordIO magic number."""
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR_HEADER = struct.Struct("<IfQQ")


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` pair that cannot be read: what is wrong and where."""


def _index_path(rec: Path) -> Path:
    return rec.with_suffix(".idx")


def read_index(path: str | os.PathLike[str]) -> dict[int, int]:
    """``key -> byte offset`` from a ``.idx`` file (``key<TAB>offset`` lines)."""
    out: dict[int, int] = {}
    with open(path, encoding="ascii") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                key, offset = line.split("\t")
                out[int(key)] = int(offset)
            except ValueError as err:
                raise RecordIOError(f"{path}:{number}: expected 'key<TAB>offset', got "
                                    f"{line.strip()!r}") from err
    return out


def read_record(handle: Any, offset: int) -> bytes:
    """The payload of the record starting at ``offset`` (parts rejoined)."""
    handle.seek(offset)
    parts: list[bytes] = []
    while True:
        head = handle.read(8)
        if len(head) < 8:
            raise RecordIOError(f"truncated record at byte {handle.tell() - len(head)}")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"no RecordIO magic at byte {handle.tell() - 8} (found "
                                f"{magic:#010x}): the index does not match the .rec file")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        data = handle.read(length)
        if len(data) < length:
            raise RecordIOError(f"truncated record at byte {handle.tell() - len(data)}: "
                                f"{length} bytes announced, {len(data)} present")
        handle.seek((4 - length % 4) % 4, io.SEEK_CUR)
        if cflag == 0:
            if parts:
                raise RecordIOError("a whole record inside a multi-part record")
            return data
        if (cflag == 1) != (not parts):
            raise RecordIOError(f"record part flag {cflag} out of order at byte "
                                f"{handle.tell()}")
        parts.append(data)
        if cflag == 3:
            return _MAGIC_BYTES.join(parts)


def unpack_payload(payload: bytes) -> tuple[np.ndarray, bytes]:
    """``(labels as float32 array, image bytes)`` of a payload (module docstring)."""
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(f"a payload of {len(payload)} bytes has no IRHeader")
    flag, label, _, _ = _IR_HEADER.unpack_from(payload)
    rest = payload[_IR_HEADER.size:]
    if flag == 0:
        return np.array([label], np.float32), rest
    need = 4 * flag
    if len(rest) < need:
        raise RecordIOError(f"IRHeader announces {flag} labels but the payload is short")
    return np.frombuffer(rest[:need], np.float32).copy(), rest[need:]


def pack_payload(labels: float | Iterable[float], image: bytes, key: int = 0) -> bytes:
    """The payload for ``labels`` (one number: ``flag = 0``) and encoded ``image`` bytes."""
    if isinstance(labels, int | float):
        return _IR_HEADER.pack(0, float(labels), key, 0) + image
    values = np.asarray(list(labels), np.float32)
    return _IR_HEADER.pack(len(values), 0.0, key, 0) + values.tobytes() + image


def _record_bytes(payload: bytes) -> bytes:
    """The payload framed as one record, split at aligned occurrences of the magic."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == _MAGIC_BYTES]
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(payload[start:cut])
        start = cut + 4
    pieces.append(payload[start:])
    out = bytearray()
    flags = [0] if len(pieces) == 1 else [1] + [2] * (len(pieces) - 2) + [3]
    for cflag, piece in zip(flags, pieces, strict=True):
        if len(piece) > _LENGTH_MASK:
            raise ValueError(f"a record part of {len(piece)} bytes exceeds RecordIO's 512 MiB")
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(piece)) + piece
        out += b"\0" * ((4 - len(piece) % 4) % 4)
    return bytes(out)


def write_record_file(items: Iterable[tuple[bytes, int]], rec_path: str | os.PathLike[str],
                      ) -> tuple[Path, int]:
    """Write ``(encoded image, label)`` items as ``rec_path`` + its ``.idx`` in insightface's
    layout (key 0 the header record, images from key 1), streaming (one item in memory at a
    time); both files are written atomically. Returns ``(rec path, number of images)``."""
    rec = Path(rec_path)
    if rec.suffix != ".rec":
        raise ValueError(f"a RecordIO file name ends in .rec, got {rec.name}")
    index: list[tuple[int, int]] = []

    def header(count: int) -> bytes:  # the same size for every count
        return _record_bytes(pack_payload([float(count + 1), float(count + 1)], b""))

    def write(handle: Any) -> None:
        handle.write(header(0))
        for key, (image, label) in enumerate(items, 1):
            if not isinstance(image, bytes | bytearray) or not image:
                raise ValueError(f"item {key - 1}: expected the encoded image's bytes")
            if int(label) != label or label < 0:
                raise ValueError(f"item {key - 1}: label {label!r} is not a class index")
            index.append((key, handle.tell()))
            handle.write(_record_bytes(pack_payload(float(label), bytes(image), key)))
        if not index:
            raise ValueError("nothing to write: no items")
        handle.seek(0)
        handle.write(header(len(index)))

    atomic_write(rec, write)
    idx_text = "0\t0\n" + "".join(f"{k}\t{o}\n" for k, o in index)
    atomic_write(_index_path(rec), lambda h: h.write(idx_text.encode("ascii")))
    return rec, len(index)


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))  # writable: torch.from_numpy takes it as is


class RecordDataset(Dataset):
    """An insightface ``train.rec`` (module docstring) as an identity dataset.

    Args:
        rec_path: the ``.rec`` file; its index is the ``.idx`` beside it.
        transform: applied to each decoded ``(H, W, 3)`` uint8 array (default: none).

    Raises:
        FileNotFoundError: the ``.rec`` or its ``.idx`` is missing.
        RecordIOError: the files do not match, a record is damaged, or the labels are not
            the integers ``0 .. C − 1``.
    """

    def __init__(self, rec_path: str | os.PathLike[str],
                 transform: Callable[[np.ndarray], Any] | None = None) -> None:
        self.path = Path(rec_path)
        idx = _index_path(self.path)
        for p in (self.path, idx):
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing: a RecordIO training set is a .rec "
                                        "file with its .idx beside it")
        self.transform = transform
        offsets = read_index(idx)
        with open(self.path, "rb") as handle:
            keys = self._image_keys(handle, offsets)
            self.offsets = np.array([offsets[k] for k in keys], np.int64)
            self.targets = np.array([self._label(handle, int(o)) for o in self.offsets],
                                    np.int64)
        self.keys = np.asarray(keys, np.int64)
        if self.targets.size == 0:
            raise RecordIOError(f"{self.path} holds no images")
        self.class_counts = np.bincount(self.targets).astype(np.int64)
        if (self.class_counts == 0).any():
            missing = int(np.flatnonzero(self.class_counts == 0)[0])
            raise RecordIOError(f"{self.path}: labels must be 0 .. C−1 without gaps; no image "
                                f"has label {missing}")
        self._handle: Any = None
        self._pid = -1

    @staticmethod
    def _image_keys(handle: Any, offsets: dict[int, int]) -> list[int]:
        if 0 in offsets:
            labels, image = unpack_payload(read_record(handle, offsets[0]))
            if not image and labels.size >= 1:  # insightface's header record
                end = int(labels[0])
                keys = list(range(1, end))
                lost = [k for k in keys if k not in offsets]
                if lost:
                    raise RecordIOError(f"the header record names images 1..{end - 1} but "
                                        f"the index lacks key {lost[0]}")
                return keys
        return sorted(offsets)

    @staticmethod
    def _label(handle: Any, offset: int) -> int:
        labels, _ = unpack_payload(read_record(handle, offset))
        value = float(labels[0])
        if value != int(value) or value < 0:
            raise RecordIOError(f"record at byte {offset}: label {value} is not a class index")
        return int(value)

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.size)

    def __len__(self) -> int:
        return int(self.offsets.size)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115
        _, data = unpack_payload(read_record(self._handle, int(self.offsets[index])))
        image = _decode(data)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, -1  # each worker opens its own
        return state


__all__ = [
    "MAGIC",
    "RecordDataset",
    "RecordIOError",
    "pack_payload",
    "read_index",
    "read_record",
    "unpack_payload",
    "write_record_file",
]
