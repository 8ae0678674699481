"""From landmark sets to point correspondences with the 112×112 ArcFace template.

The template (:data:`~facemetric.align.warp.ARCFACE_TEMPLATE`) names five points: the two
eye centres, the nose tip and the two mouth corners, "left" meaning the image's left. No
landmark set used here gives exactly those five, so each scheme says which of its points
stand for which template points — and, where it has no counterpart, leaves the template
point out rather than invent it. The similarity fit then uses the pairs that exist.

Schemes (``(n, 2)`` arrays of ``(x, y)``):

``"arcface5"``
    The five template points themselves, in template order (e.g. from a 5-point file).
``"dlib68"``
    iBUG 300-W 68 points (dlib's ``shape_predictor_68_face_landmarks``): eye centres are the
    means of the six eye-contour points (36–41, 42–47), nose tip 30, mouth corners 48, 54.
``"dlib5"``
    dlib's ``shape_predictor_5_face_landmarks``: points 0–1 and 2–3 are the outer and inner
    corners of the image-right and image-left eye, 4 the base of the nose. It has no mouth
    corners. Eye centres are corner midpoints (0.69 px, in template pixels, from the
    68-point contour means on the same 60 LFW faces); the nose base is matched to
    :data:`DLIB5_NOSE_BASE`, where the 68-point nose base lands on average once faces are
    aligned to the template by their 68-point landmarks (measured on 60 LFW faces).
``"cfp30"``
    CFP's hand-labelled fiducials (Sengupta et al., WACV 2016). Their readme gives no
    layout; plotted, the 30 points cover the visible half of the face (the image-left
    half of a frontal face, the near side of a profile): 0–8 jaw from ear to chin, 9–11
    brow, 12–17 eye contour, 18–21 nose ridge down to the tip, 22–24 nose base, 25 the
    visible mouth corner, 26–29 the lips on the mid-line (upper lip top, upper lip bottom,
    lower lip bottom, lower lip top). Used: the eye centre (mean of 12–17), the nose tip
    (21), the mouth corner (25) and the mouth centre (mean of 26–29, matched to the
    midpoint of the template's mouth corners). The side is read from the points: an eye
    left of the nose tip is matched to the template's left eye and left mouth corner,
    otherwise to the right ones. For a profile this is the same convention a 5-point
    detector follows (the visible eye is an eye of the template), not a 3-D frontalisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facemetric.align.warp import ARCFACE_TEMPLATE

SCHEMES = ("arcface5", "dlib5", "dlib68", "cfp30")
"""Landmark layouts :func:`template_correspondences` understands."""

_SCHEME_SIZES = {"arcface5": 5, "dlib5": 5, "dlib68": 68, "cfp30": 30}

DLIB5_NOSE_BASE = np.array([55.57, 79.48])
"""Template position (112×112 pixels) matched to dlib's 5-point nose base.

Mean of dlib 5-point landmark 4 over 60 LFW deep-funneled faces (every 97th identity,
first image; default HOG detector) after warping each face by the similarity fitted to its
68-point five points; the 68-point nose base (landmark 33) lands at (55.62, 79.62) on the
same faces.
"""

_MOUTH_CENTRE = ARCFACE_TEMPLATE[3:5].mean(axis=0)


def _points(points: np.ndarray, count: int, scheme: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.shape != (count, 2):
        raise ValueError(f"{scheme!r} landmarks must have shape ({count}, 2), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{scheme!r} landmarks contain NaN or Inf")
    return arr


def template_correspondences(points: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Pair landmark ``points`` of a ``scheme`` with the ArcFace template points they match.

    Args:
        points: ``(n, 2)`` landmarks as ``(x, y)`` in image pixels, ``n`` fixed by the scheme.
        scheme: one of :data:`SCHEMES` (see the module docstring for each mapping).

    Returns:
        ``(src, dst)``, both ``(k, 2)`` float64: image points and the template points
        (112×112 pixels) they should land on; ``k`` is 3 (dlib5), 4 (cfp30) or 5.

    Raises:
        ValueError: unknown scheme, wrong number of points, non-finite values.
    """
    if scheme not in _SCHEME_SIZES:
        raise ValueError(f"unknown landmark scheme {scheme!r}; choose one of {SCHEMES}")
    pts = _points(points, _SCHEME_SIZES[scheme], scheme)
    tpl = ARCFACE_TEMPLATE
    if scheme == "arcface5":
        return pts, tpl.copy()
    if scheme == "dlib68":
        src = np.stack(
            [pts[36:42].mean(axis=0), pts[42:48].mean(axis=0), pts[30], pts[48], pts[54]]
        )
        return src, tpl.copy()
    if scheme == "dlib5":
        src = np.stack([pts[2:4].mean(axis=0), pts[0:2].mean(axis=0), pts[4]])
        dst = np.stack([tpl[0], tpl[1], DLIB5_NOSE_BASE])
        return src, dst
    # cfp30
    eye = pts[12:18].mean(axis=0)
    nose = pts[21]
    left_side = eye[0] < nose[0]
    eye_t, mouth_t = (tpl[0], tpl[3]) if left_side else (tpl[1], tpl[4])
    src = np.stack([eye, nose, pts[25], pts[26:30].mean(axis=0)])
    dst = np.stack([eye_t, tpl[2], mouth_t, _MOUTH_CENTRE])
    return src, dst


def read_landmark_file(path: str | Path) -> np.ndarray:
    """Read a landmark text file: one point per line, ``x,y`` or ``x y``; returns ``(n, 2)``.

    Blank lines and lines starting with ``#`` are skipped (CFP's ``Fiducials/*.txt`` and
    plain 5-point files both read this way).

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not two numbers, or the file holds no points.
    """
    rows: list[tuple[float, float]] = []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.replace(",", " ").split()
        try:
            if len(fields) != 2:
                raise ValueError
            x, y = float(fields[0]), float(fields[1])
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: expected 'x,y' or 'x y', got {line[:60]!r}"
            ) from None
        rows.append((x, y))
    if not rows:
        raise ValueError(f"{path}: no landmark points")
    return np.array(rows, dtype=np.float64)


def scheme_for_count(count: int) -> str:
    """The scheme of a landmark file with ``count`` points: 5 → arcface5, 30 → cfp30,
    68 → dlib68 (a file never holds dlib's raw 5 points: it would be ambiguous)."""
    by_count = {5: "arcface5", 30: "cfp30", 68: "dlib68"}
    if count not in by_count:
        raise ValueError(
            f"a landmark file must hold 5 (ArcFace order), 30 (CFP) or 68 (iBUG) points, "
            f"got {count}"
        )
    return by_count[count]
