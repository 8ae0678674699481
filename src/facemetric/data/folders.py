"""Identity datasets from folders: ``root/<identity>/<image>``, optionally filtered by a list file.

``IdentityFolder`` turns a tree with one folder per person into a ``torch`` dataset with
contiguous integer labels. A list file in LFW's format picks which identities to use, so a
model trains on ``peopleDevTrain.txt`` and is tested on the disjoint ``peopleDevTest.txt``.

Broken images never crash an epoch and are never dropped silently: a file that fails to load
is logged (``logging.WARNING``, path and reason, once per file), recorded in ``failures``, and
``__getitem__`` returns the next loadable image **of the same identity** in its place, so the
label — and the P×K structure a sampler built the batch on — stays intact. Only when every
image of that identity is broken does it fall back to another identity (logged as well). Call
``verify()`` before training to find every broken file up front and drop it.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from facemetric.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image

logger = logging.getLogger(__name__)

PeopleList = list[list[tuple[str, int]]]


@dataclass(frozen=True)
class LoadFailure:
    """An image that could not be loaded: its path and why."""

    path: Path
    reason: str


def read_people_file(path: str | os.PathLike[str]) -> PeopleList:
    """Read an LFW people list; return its folds, each a list of ``(name, image_count)``.

    Two layouts are accepted (blank lines ignored, fields separated by whitespace):

    - View 1 (``peopleDevTrain.txt``, ``peopleDevTest.txt``): the first line is the number of
      people ``N``, then ``N`` lines ``Name count``. Returned as a single fold.
    - View 2 (``people.txt``): the first line is the number of folds ``F``; each fold is a
      line with its number of people ``n`` followed by ``n`` lines ``Name count``. Returned
      as ``F`` folds, in file order.

    Raises:
        ValueError: the file fits neither layout (the message gives the line number), or a
            name is listed twice.
    """
    path = Path(path)
    lines: list[tuple[int, list[str]]] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.strip()
        if text:
            lines.append((number, text.rsplit(None, 1)))
    if not lines:
        raise ValueError(f"{path}: the people list is empty")

    def header(i: int) -> int:
        number, fields = lines[i]
        if len(fields) != 1 or not fields[0].isdigit():
            raise ValueError(f"{path}:{number}: expected a count line, got {' '.join(fields)!r}")
        return int(fields[0])

    def entry(i: int) -> tuple[str, int]:
        number, fields = lines[i]
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(
                f"{path}:{number}: expected 'Name count', got {' '.join(fields)!r}"
            )
        return fields[0], int(fields[1])

    first = header(0)
    if all(len(fields) == 2 for _, fields in lines[1:]):
        if len(lines) - 1 != first:
            raise ValueError(
                f"{path}: the header announces {first} people but {len(lines) - 1} are listed"
            )
        folds: PeopleList = [[entry(i) for i in range(1, len(lines))]]
    else:
        folds = []
        i = 1
        for _ in range(first):
            if i >= len(lines):
                raise ValueError(f"{path}: announces {first} folds but ends after {len(folds)}")
            size = header(i)
            if i + size > len(lines) - 1:
                raise ValueError(f"{path}:{lines[i][0]}: fold of {size} people runs past the end")
            folds.append([entry(j) for j in range(i + 1, i + 1 + size)])
            i += 1 + size
        if i != len(lines):
            raise ValueError(f"{path}:{lines[i][0]}: unexpected lines after {first} folds")

    seen: set[str] = set()
    for fold in folds:
        for name, _ in fold:
            if name in seen:
                raise ValueError(f"{path}: {name!r} is listed more than once")
            seen.add(name)
    return folds


def _natural_key(name: str) -> tuple[Any, ...]:
    # "2.pgm" before "10.pgm": digit runs compare as numbers.
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).contiguous().float().div_(255.0)


class IdentityFolder(Dataset):
    """Images in ``root/<identity>/<file>`` as ``(image, label)`` pairs.

    Args:
        root: the folder holding one sub-folder per identity. Only files directly inside an
            identity folder, with an image extension (``extensions``, case-insensitive) and
            not hidden (``.`` prefix), are used; anything else is ignored.
        people_file: an LFW people list (see ``read_people_file``) naming the identities to
            use; every listed identity must have a folder. A listed image count that differs
            from the images found is logged as a warning. ``None`` uses every folder.
        folds: with a View-2 list (``people.txt``), the 0-based folds to use (e.g. nine for
            training, leaving the tenth out); ``None`` means all folds.
        min_images: identities with fewer images are left out (after the list filter).
        transform: called on the ``(H, W, 3)`` uint8 RGB array; its result is returned as the
            image. ``None`` gives a ``(3, H, W)`` float32 tensor in ``[0, 1]``.
        extensions: file endings counted as images.

    Attributes:
        classes: identity names, sorted; ``label`` indexes this list.
        class_to_idx: name → label.
        samples: ``(path, label)`` for every image, grouped by identity, files in natural
            order (``2.pgm`` before ``10.pgm``).
        targets: ``int64`` array of the labels of ``samples``.
        class_counts: ``int64`` array, the number of images of each label.
        failures: ``LoadFailure`` for each image found broken so far (in this process: with
            ``DataLoader(num_workers > 0)`` each worker keeps its own list and logs its own
            warnings; run ``verify()`` first to collect them all here).

    Labels are contiguous ``0 .. len(classes) - 1`` in sorted name order.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        people_file: str | os.PathLike[str] | None = None,
        folds: Sequence[int] | None = None,
        min_images: int = 1,
        transform: Callable[[np.ndarray], Any] | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"identity folder root {self.root} is not a directory")
        if min_images < 1:
            raise ValueError(f"min_images must be at least 1, got {min_images}")
        self.min_images = min_images
        self.transform = transform
        self.extensions = frozenset(e.lower() for e in extensions)
        self.failures: list[LoadFailure] = []
        self._bad: set[Path] = set()

        listed = self._listed_people(people_file, folds)
        if listed is None:
            names = sorted(
                p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
        else:
            missing = [n for n in listed if not (self.root / n).is_dir()]
            if missing:
                raise ValueError(
                    f"{len(missing)} identities of {people_file} have no folder under "
                    f"{self.root}, e.g. {missing[:5]}; is root the folder of identity folders?"
                )
            names = sorted(listed)

        files = {name: self._scan(self.root / name) for name in names}
        if listed is not None:
            off = [(n, listed[n], len(files[n])) for n in names if listed[n] != len(files[n])]
            if off:
                examples = ", ".join(f"{n}: listed {a}, found {b}" for n, a, b in off[:5])
                logger.warning(
                    "%d identities of %s have a different number of images than listed (%s)",
                    len(off),
                    people_file,
                    examples,
                )
        self._build(files)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _listed_people(
        people_file: str | os.PathLike[str] | None, folds: Sequence[int] | None
    ) -> dict[str, int] | None:
        if people_file is None:
            if folds is not None:
                raise ValueError("folds selects folds of a people_file; none was given")
            return None
        all_folds = read_people_file(people_file)
        chosen = range(len(all_folds)) if folds is None else folds
        listed: dict[str, int] = {}
        for k in chosen:
            if not 0 <= k < len(all_folds):
                raise ValueError(
                    f"fold {k} does not exist: {people_file} has {len(all_folds)} fold(s), "
                    f"numbered 0..{len(all_folds) - 1}"
                )
            listed.update(all_folds[k])
        return listed

    def _scan(self, folder: Path) -> list[Path]:
        found = [
            p
            for p in folder.iterdir()
            if not p.name.startswith(".") and p.suffix.lower() in self.extensions and p.is_file()
        ]
        return sorted(found, key=lambda p: _natural_key(p.name))

    def _build(self, files: dict[str, list[Path]]) -> None:
        kept = sorted(n for n, paths in files.items() if len(paths) >= self.min_images)
        self.classes: list[str] = kept
        self.class_to_idx: dict[str, int] = {n: i for i, n in enumerate(kept)}
        self.samples: list[tuple[Path, int]] = [
            (p, label) for label, name in enumerate(kept) for p in files[name]
        ]
        self.targets = np.fromiter((y for _, y in self.samples), np.int64, len(self.samples))
        self.class_counts = np.bincount(self.targets, minlength=len(kept)).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(self.class_counts)])
        self._class_ranges = [(int(a), int(b)) for a, b in itertools.pairwise(starts)]

    # ------------------------------------------------------------------ dataset protocol

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """``(image, label)``; a broken file is replaced as described in the module doc."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for candidate in self._candidates(index):
            path, label = self.samples[candidate]
            if path in self._bad:
                continue
            try:
                image = load_image(path)
            except ImageLoadError as err:
                self._record(err)
                continue
            if candidate != index:
                want = self.samples[index][1]
                logger.warning(
                    "IdentityFolder: returning %s in place of unreadable %s (%s)",
                    path,
                    self.samples[index][0],
                    "same identity" if label == want else "no readable image of that identity",
                )
            out = _to_tensor(image) if self.transform is None else self.transform(image)
            return out, label
        raise RuntimeError(
            f"no image under {self.root} can be loaded ({len(self.failures)} failed)"
        )

    def _candidates(self, index: int) -> Iterable[int]:
        """``index``, then the rest of its identity (cyclically), then every other sample."""
        lo, hi = self._class_ranges[self.samples[index][1]]
        yield index
        for k in range(1, hi - lo):
            yield lo + (index - lo + k) % (hi - lo)
        n = len(self.samples)
        for k in range(1, n):
            j = (index + k) % n
            if not lo <= j < hi:
                yield j

    def _record(self, err: ImageLoadError) -> None:
        if err.path in self._bad:
            return
        self._bad.add(err.path)
        self.failures.append(LoadFailure(err.path, err.reason))
        logger.warning("IdentityFolder: skipping unreadable image %s: %s", err.path, err.reason)

    # ------------------------------------------------------------------ eager check

    def verify(self, workers: int = 1, drop: bool = True) -> list[LoadFailure]:
        """Decode every image now; return the failures found (also added to ``failures``).

        With ``drop=True`` the broken files are removed from ``samples``; identities left with
        fewer than ``min_images`` images are removed too and the labels renumbered to stay
        contiguous — so call it before building samplers or heads. ``workers > 1`` decodes in
        that many threads (PIL releases the GIL while decoding).
        """
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        todo = [p for p, _ in self.samples if p not in self._bad]

        def check(path: Path) -> ImageLoadError | None:
            try:
                load_image(path)
            except ImageLoadError as err:
                return err
            return None

        if workers == 1:
            results = [check(p) for p in todo]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(check, todo))
        found = [err for err in results if err is not None]
        for err in found:
            self._record(err)
        if drop:
            files: dict[str, list[Path]] = {name: [] for name in self.classes}
            for path, label in self.samples:
                if path not in self._bad:
                    files[self.classes[label]].append(path)
            self._build(files)
        return [LoadFailure(err.path, err.reason) for err in found]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, classes={len(self.classes)}, "
            f"samples={len(self.samples)}, failures={len(self.failures)})"
        )


__all__ = ["IdentityFolder", "LoadFailure", "read_people_file"]
