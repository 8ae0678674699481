"""Readers for verification protocols: LFW pair files, CFP's splits, ``.bin`` pair sets.

Every reader returns pairs in the protocol's own order with one fold id per pair, ready for
``verification_report(scores, pairs.is_same, folds=pairs.fold)``.

- LFW View 2, ``pairs.txt``: header ``10 300`` (folds, pairs per class per fold), then each
  fold as a contiguous block of 300 matched lines ``Name i j`` followed by 300 mismatched
  lines ``Name1 i Name2 j``; fold ids are the block numbers 0..9.
- LFW View 1, ``pairsDevTrain.txt``/``pairsDevTest.txt``: header ``N``, then N matched
  lines followed by N mismatched lines; fold ids are interleaved (pair ``i`` in fold
  ``i mod num_folds``), as contiguous blocks would hold a single class.
  Image numbers are 1-based: ``Name i`` is ``<image_root>/Name/Name_{i:04d}.jpg``.
- CFP (Sengupta et al. 2016): ``Protocol/Split/{FF,FP}/01..10/{same,diff}.txt`` hold
  ``i,j`` pairs, numbered by ``Protocol/Pair_list_F.txt`` (frontal) and ``Pair_list_P.txt``
  (profile) lines ``number path`` with paths relative to ``Protocol/``. FF pairs two
  frontal images, FP a frontal (i) and a profile (j). Folds 01..10 become 0..9; each fold
  lists its ``same`` pairs, then its ``diff`` pairs.
- ``.bin`` sets (the insightface packaging of LFW, CFP-FP, AgeDB...): a pickle of
  ``(images, is_same)`` — ``2·n`` encoded images (pair ``i`` is images ``2i`` and ``2i+1``)
  and ``n`` booleans. A pickle can run arbitrary code while loading, so ``load_verification_bin``
  uses an unpickler that resolves no global except numpy's array-pickling helpers, each
  replaced by a checked stand-in that builds only bool/uint8 arrays (some files store
  ``is_same`` as a numpy bool array); every other global raises
  ``pickle.UnpicklingError`` *before* anything it names could run (see
  ``_SafeUnpickler``). Folds are 10 contiguous blocks (the order of those files follows the
  original protocol's folds).
"""

from __future__ import annotations

import codecs
import io
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class PairList:
    """Image pairs of a verification protocol: ``path_a[i]`` vs ``path_b[i]``.

    ``is_same`` (bool) and ``fold`` (int64) are read-only arrays aligned with the paths.
    """

    path_a: tuple[Path, ...]
    path_b: tuple[Path, ...]
    is_same: np.ndarray
    fold: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.path_a)
        same = np.array(self.is_same, dtype=bool)  # copies: the caller's arrays stay writable
        fold = np.array(self.fold, dtype=np.int64)
        if len(self.path_b) != n or same.shape != (n,) or fold.shape != (n,):
            raise ValueError(
                f"PairList fields differ in length: {n}, {len(self.path_b)}, "
                f"{same.shape}, {fold.shape}"
            )
        for name, arr in (("is_same", same), ("fold", fold)):
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return len(self.path_a)

    def unique_images(self) -> tuple[tuple[Path, ...], np.ndarray, np.ndarray]:
        """``(images, index_a, index_b)``: each distinct image once (sorted), and where each
        pair's images sit in it — embed ``images`` once, then score
        ``embeddings[index_a]`` against ``embeddings[index_b]``."""
        images = tuple(sorted(set(self.path_a) | set(self.path_b)))
        where = {p: i for i, p in enumerate(images)}
        index_a = np.fromiter((where[p] for p in self.path_a), np.int64, len(self))
        index_b = np.fromiter((where[p] for p in self.path_b), np.int64, len(self))
        return images, index_a, index_b

    def missing_images(self) -> list[Path]:
        """Referenced images that do not exist on disk (sorted)."""
        return [p for p in self.unique_images()[0] if not p.is_file()]


def _lfw_path(root: Path, name: str, number: str, where: str) -> Path:
    if not number.isdigit() or int(number) < 1:
        raise ValueError(f"{where}: image number must be a positive integer, got {number!r}")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{where}: a person's name cannot be a path, got {name!r}")
    return Path(os.path.join(root, name, f"{name}_{int(number):04d}.jpg"))


#: Suffixes an aligned copy of a protocol's image may have (``facemetric align`` writes
#: ``.jpg`` or ``.png`` whatever the source's).
ALIGNED_SUFFIXES = (".jpg", ".png", ".jpeg")


def existing_image(path: Path) -> Path:
    """``path``, or the same name with another of :data:`ALIGNED_SUFFIXES` if only that
    exists (``path`` itself when none does: loading it then reports it missing)."""
    if path.is_file():
        return path
    for suffix in ALIGNED_SUFFIXES:
        other = path.with_suffix(suffix)
        if other != path and other.is_file():
            return other
    return path


def with_existing_images(pairs: PairList) -> PairList:
    """``pairs`` with each path replaced by :func:`existing_image` of it."""
    mapping = {p: existing_image(p) for p in set(pairs.path_a) | set(pairs.path_b)}
    return PairList(
        tuple(mapping[p] for p in pairs.path_a),
        tuple(mapping[p] for p in pairs.path_b),
        pairs.is_same,
        pairs.fold,
    )


def read_lfw_pairs(pairs_file: str | Path, image_root: str | Path, num_folds: int = 10) -> PairList:
    """Read LFW's ``pairs.txt`` (View 2) or ``pairsDevTrain/DevTest.txt`` (View 1).

    The header decides: two numbers ``folds per_class`` mean View 2 (contiguous fold
    blocks, ``num_folds`` is ignored); one number ``N`` means View 1 (interleaved
    ``num_folds`` folds). Every line is checked for its expected kind (3 fields matched,
    4 mismatched) and count. Paths are built under ``image_root`` (e.g.
    ``lfw/lfw-deepfunneled``); whether they exist is checked by ``PairList.missing_images``.
    """
    pairs_file = Path(pairs_file)
    root = Path(image_root)
    lines = [ln.split() for ln in pairs_file.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"{pairs_file}: empty file")
    header, body = lines[0], lines[1:]
    if not all(h.isdigit() for h in header) or len(header) not in (1, 2):
        raise ValueError(f"{pairs_file}: header must be 'N' or 'folds N', got {header}")
    if len(header) == 2:
        folds, per_class = int(header[0]), int(header[1])
        expect_same = np.tile(np.r_[np.ones(per_class, bool), np.zeros(per_class, bool)], folds)
        fold = np.repeat(np.arange(folds, dtype=np.int64), 2 * per_class)
    else:
        per_class = int(header[0])
        expect_same = np.r_[np.ones(per_class, bool), np.zeros(per_class, bool)]
        fold = np.arange(2 * per_class, dtype=np.int64) % num_folds
    if len(body) != expect_same.shape[0]:
        raise ValueError(
            f"{pairs_file}: header {' '.join(header)} announces {expect_same.shape[0]} pairs, "
            f"found {len(body)} lines"
        )
    path_a: list[Path] = []
    path_b: list[Path] = []
    for i, (fields, same) in enumerate(zip(body, expect_same.tolist(), strict=True)):
        where = f"{pairs_file}:{i + 2}"
        if same and len(fields) == 3:
            name, n1, n2 = fields
            path_a.append(_lfw_path(root, name, n1, where))
            path_b.append(_lfw_path(root, name, n2, where))
        elif not same and len(fields) == 4:
            name1, n1, name2, n2 = fields
            path_a.append(_lfw_path(root, name1, n1, where))
            path_b.append(_lfw_path(root, name2, n2, where))
        else:
            kind = "matched 'Name i j'" if same else "mismatched 'Name1 i Name2 j'"
            raise ValueError(f"{where}: expected a {kind} line, got {' '.join(fields)!r}")
    return PairList(tuple(path_a), tuple(path_b), expect_same, fold)


def _read_cfp_list(path: Path) -> dict[int, Path]:
    base = path.parent
    table: dict[int, Path] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'number path', got {line!r}")
        table[int(fields[0])] = Path(os.path.normpath(base / fields[1]))
    return table


def read_cfp_pairs(cfp_root: str | Path, protocol: str = "FP") -> PairList:
    """Read CFP's 10-fold ``FF`` (frontal–frontal) or ``FP`` (frontal–profile) protocol.

    ``cfp_root`` holds ``Protocol/`` and ``Data/``. Each fold gives 350 ``same`` then 350
    ``diff`` pairs in the released files; the counts are read, not assumed.
    """
    if protocol not in ("FF", "FP"):
        raise ValueError(f"protocol must be 'FF' or 'FP', got {protocol!r}")
    proto = Path(cfp_root) / "Protocol"
    frontal = _read_cfp_list(proto / "Pair_list_F.txt")
    second = frontal if protocol == "FF" else _read_cfp_list(proto / "Pair_list_P.txt")
    split_dir = proto / "Split" / protocol
    fold_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
    if not fold_dirs:
        raise ValueError(f"{split_dir}: no fold folders")
    path_a: list[Path] = []
    path_b: list[Path] = []
    same: list[bool] = []
    fold: list[int] = []
    for f, fold_dir in enumerate(fold_dirs):
        for kind, flag in (("same", True), ("diff", False)):
            file = fold_dir / f"{kind}.txt"
            for lineno, line in enumerate(file.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.replace(" ", "").split(",")
                if len(parts) != 2 or not all(p.isdigit() for p in parts):
                    raise ValueError(f"{file}:{lineno}: expected 'i,j', got {line!r}")
                i, j = int(parts[0]), int(parts[1])
                if i not in frontal or j not in second:
                    raise ValueError(f"{file}:{lineno}: image number out of the pair lists")
                path_a.append(frontal[i])
                path_b.append(second[j])
                same.append(flag)
                fold.append(f)
    return PairList(
        tuple(path_a), tuple(path_b), np.array(same, dtype=bool), np.array(fold, dtype=np.int64)
    )


# --------------------------------------------------------------------------- .bin sets


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"refused {what} in a verification .bin")


class _ArrayToken:
    """What the pickle sees instead of an array: built empty by ``_reconstruct`` and given
    its checked data by BUILD (``(version, shape, dtype, is_fortran, raw_bytes)``), or
    built full by ``_frombuffer``; swapped for its array after loading. Its own
    ``__setstate__`` and ``__slots__`` leave BUILD no other way to touch it."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None) -> None:
        self.array = array

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise _refuse("an array state of unexpected form")
        _, shape, dtype, fortran, raw = state
        self.array = _array_from(raw, dtype, shape, "F" if fortran is True else "C")


class _DtypeToken:
    """What the pickle sees instead of a dtype (bool or uint8 only). Never a real
    ``np.dtype``, so BUILD cannot rewrite a dtype's internals (flags, item size)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: object) -> None:
        # Byte order and the other fields are moot for these 1-byte types: ignored.
        if not isinstance(state, tuple):
            raise _refuse("a dtype state that is not a tuple")


def _array_from(raw: object, dtype: object, shape: object, order: object) -> np.ndarray:
    if isinstance(raw, str):  # protocol 0-2 and latin-1 text
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)) or type(dtype) is not _DtypeToken:
        raise _refuse("array data or dtype of unexpected type")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise _refuse("an array shape that is not a tuple of sizes")
    if order not in ("C", "F") or math.prod(shape) != len(raw):
        raise _refuse("array data whose size does not match its shape")
    return np.frombuffer(bytes(raw), dtype=dtype.dtype).reshape(shape, order=order).copy()


# dtype spellings numpy's pickles use for bool and uint8 (bytes in Python 2 files).
_DTYPE_SPECS = {"b1": np.dtype(bool), "|b1": np.dtype(bool), "?": np.dtype(bool),
                "u1": np.dtype(np.uint8), "|u1": np.dtype(np.uint8)}  # fmt: skip


def _safe_dtype(spec: object, align: object = False, copy: object = True) -> _DtypeToken:
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if isinstance(spec, str) and spec in _DTYPE_SPECS and align in (0, 1) and copy in (0, 1):
        return _DtypeToken(_DTYPE_SPECS[spec])
    raise _refuse(f"numpy dtype {spec!r} (only bool and uint8)")


def _refuse_ndarray_call(*args: object) -> object:
    raise _refuse("a direct numpy.ndarray call")


class _StandIn:
    """A checked function handed to the pickle in place of a numpy global. Its
    ``__setstate__`` refuses BUILD, so a pickle cannot set attributes on it."""

    __slots__ = ("_func",)

    def __init__(self, func: Callable[..., object]) -> None:
        self._func = func

    def __call__(self, *args: object) -> object:
        return self._func(*args)

    def __setstate__(self, state: object) -> None:
        raise _refuse("a state for a loader stand-in")


_NDARRAY = _StandIn(_refuse_ndarray_call)


def _safe_reconstruct(subtype: object, shape: object, code: object) -> _ArrayToken:
    if subtype is not _NDARRAY or not isinstance(code, bytes):
        raise _refuse("an array reconstruction of another type")
    return _ArrayToken()


def _safe_frombuffer(buf: object, dtype: object, shape: object, order: object) -> _ArrayToken:
    return _ArrayToken(_array_from(buf, dtype, shape, order))


def _safe_encode(text: object, encoding: object = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise _refuse("a codecs.encode call other than latin-1 text")
    return codecs.encode(text, "latin1")


# The only globals a .bin may name: numpy's own array-pickling helpers, each replaced by a
# checked stand-in. Both spellings of numpy's core module are accepted (numpy < 2 and ≥ 2).
_ALLOWED_GLOBALS: dict[tuple[str, str], _StandIn] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _StandIn(_safe_dtype),
    ("numpy.core.multiarray", "_reconstruct"): _StandIn(_safe_reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): _StandIn(_safe_reconstruct),
    ("numpy.core.numeric", "_frombuffer"): _StandIn(_safe_frombuffer),
    ("numpy._core.numeric", "_frombuffer"): _StandIn(_safe_frombuffer),
    ("_codecs", "encode"): _StandIn(_safe_encode),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain data.

    ``find_class`` is the single door through which a pickle reaches code (GLOBAL,
    STACK_GLOBAL, INST, OBJ and the extension registry all go through it). It refuses every
    name but numpy's array-pickling helpers, and for those hands out stand-ins defined here
    that build nothing but bool/uint8 arrays from checked arguments; no real numpy function,
    type, array or dtype object is reachable from the pickle while it loads, and every
    object it can reach refuses or validates BUILD. Persistent ids are refused by
    ``pickle.Unpickler`` itself. What survives is bytes, str, numbers, None, lists, tuples,
    dicts and the tokens above (turned into bool/uint8 arrays afterwards), and the loader
    then insists on the expected structure.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}: a verification .bin holds only "
                "image bytes and booleans"
            ) from None


def _resolve_array(obj: object) -> object:
    if isinstance(obj, _ArrayToken):
        if obj.array is None:
            raise ValueError("a pickled array was never given its data")
        return obj.array
    return obj


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class VerificationBin:
    """A ``.bin`` verification set: pair ``i`` is ``images[2i]`` vs ``images[2i + 1]``
    (encoded image bytes, e.g. JPEG/PNG), ``is_same[i]``, ``fold[i]`` (10 contiguous
    blocks)."""

    images: tuple[bytes, ...]
    is_same: np.ndarray
    fold: np.ndarray

    def __len__(self) -> int:
        return int(self.is_same.shape[0])


def load_verification_bin(path: str | Path, num_folds: int = 10) -> VerificationBin:
    """Load an insightface-style ``.bin`` without executing anything from the file.

    Accepts ``(images, is_same)`` where ``images`` is a list/tuple of ``bytes`` (or of 1-D
    uint8 arrays) and ``is_same`` a list/tuple of bools (or 0/1 ints) or a bool array.
    Raises ``pickle.UnpicklingError`` for any pickled code or class and ``ValueError`` for
    an unexpected structure.
    """
    data = Path(path).read_bytes()
    obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (images, is_same) pair")
    raw_images, raw_same = obj[0], _resolve_array(obj[1])
    if not isinstance(raw_images, (list, tuple)):
        raise ValueError(f"{path}: images must be a list, got {type(raw_images).__name__}")
    images: list[bytes] = []
    for i, item in enumerate(raw_images):
        im = _resolve_array(item)
        if isinstance(im, (bytes, bytearray)):
            images.append(bytes(im))
        elif isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 1:
            images.append(im.tobytes())
        else:
            raise ValueError(f"{path}: image {i} is a {type(im).__name__}, expected bytes")
    if isinstance(raw_same, np.ndarray):
        if raw_same.dtype != bool or raw_same.ndim != 1:
            raise ValueError(f"{path}: is_same array must be 1-D bool, got {raw_same.dtype}")
        same = raw_same.copy()
    elif isinstance(raw_same, (list, tuple)) and all(
        isinstance(v, (bool, int)) and v in (0, 1) for v in raw_same
    ):
        same = np.array([bool(v) for v in raw_same], dtype=bool)
    else:
        raise ValueError(f"{path}: is_same must be a list of bools")
    if len(images) != 2 * same.shape[0]:
        raise ValueError(
            f"{path}: {len(images)} images for {same.shape[0]} pairs (need two per pair)"
        )
    n = same.shape[0]
    if n < num_folds:
        raise ValueError(f"{path}: {n} pairs cannot fill {num_folds} folds")
    fold = (np.arange(n, dtype=np.int64) * num_folds) // n
    same.flags.writeable = False
    fold.flags.writeable = False
    return VerificationBin(images=tuple(images), is_same=same, fold=fold)
