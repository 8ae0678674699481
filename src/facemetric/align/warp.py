"""Least-squares similarity transforms and the warp to the 112×112 ArcFace template.

A similarity transform ``x ↦ s·R·x + t`` (scale ``s > 0``, rotation ``R``, no reflection,
no shear) keeps a face's proportions: it only places it. It is fitted to ``n ≥ 2`` point
correspondences by Umeyama's closed form (Umeyama, "Least-squares estimation of
transformation parameters between two point patterns", PAMI 1991) and applied with
``cv2.warpAffine``.

Points are ``(x, y)`` pixel coordinates with integer values at pixel centres (the convention
of OpenCV and dlib). A transform is a ``(2, 3)`` float64 matrix ``[s·R | t]``.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

ALIGNED_SIZE = 112
"""Side of the aligned face, in pixels (the ArcFace input)."""

ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye centre (image left: the subject's right eye)
        [73.5318, 51.5014],  # right eye centre
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)
"""The canonical five points of a 112×112 ArcFace face, ``(5, 2)`` as ``(x, y)``."""
ARCFACE_TEMPLATE.setflags(write=False)

# Below this scale a bilinear warp skips source pixels and aliases: shrink first (INTER_AREA).
_PRESHRINK_BELOW = 0.75


def _cv2() -> ModuleType:
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("face alignment needs OpenCV: pip install 'facemetric[detect]'") from err
    return cv2


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) as (x, y), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or Inf")
    return arr


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` points onto ``dst`` points.

    Minimises ``Σ_i ‖dst_i − (s·R·src_i + t)‖²`` over ``s > 0``, rotations ``R`` and ``t``
    (Umeyama 1991): with centred points ``X``, ``Y`` and ``U·D·Vᵀ = svd(Yᵀ·X / n)``,
    ``R = U·S·Vᵀ`` where ``S = diag(1, sign(det(U·Vᵀ)))`` forbids a reflection,
    ``s = tr(D·S) / var(X)`` and ``t = mean(Y) − s·R·mean(X)``.

    Args:
        src: ``(n, 2)`` source points, ``n ≥ 2``.
        dst: ``(n, 2)`` target points, same order.

    Returns:
        ``(2, 3)`` float64 matrix ``[s·R | t]``, usable by ``cv2.warpAffine``.

    Raises:
        ValueError: shapes differ, fewer than 2 points, non-finite values, or the source
            points all coincide (no scale or rotation can be recovered).
    """
    src = _as_points(src, "src points")
    dst = _as_points(dst, "dst points")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst differ in shape: {src.shape} vs {dst.shape}")
    n = src.shape[0]
    if n < 2:
        raise ValueError(f"a similarity transform needs at least 2 points, got {n}")
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    xs, ys = src - mu_src, dst - mu_dst
    var_src = float((xs**2).sum() / n)
    if var_src <= 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise ValueError("the source points coincide: no transform can be fitted")
    cov = ys.T @ xs / n
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = float((d * sign).sum() / var_src)
    shift = mu_dst - scale * rot @ mu_src
    return np.hstack([scale * rot, shift[:, None]])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a ``(2, 3)`` affine ``matrix`` to ``(n, 2)`` points; returns ``(n, 2)``."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"matrix must have shape (2, 3), got {m.shape}")
    pts = _as_points(points, "points")
    return pts @ m[:, :2].T + m[:, 2]


def as_rgb_image(image: np.ndarray) -> np.ndarray:
    """Check an image is ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` uint8; return it as RGB.

    Raises:
        ValueError: not a numpy array, wrong rank or channel count, not uint8, or empty.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.ndim == 2 or image.shape[2] == 1:
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    return image


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """Warp ``image`` by ``matrix`` (source → output pixels) into a ``size × size`` RGB crop.

    Bilinear interpolation, black outside the source. When the transform shrinks by more
    than 4/3 (a face in a multi-megapixel photo) the image is first reduced with area
    averaging, and the matrix corrected for it, so the output does not alias.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` uint8 (grey is replicated to 3 channels).
        matrix: ``(2, 3)`` affine transform, e.g. from :func:`estimate_similarity`.
        size: output side in pixels.

    Returns:
        ``(size, size, 3)`` uint8, C-contiguous.
    """
    cv2 = _cv2()
    image = as_rgb_image(image)
    m = np.array(matrix, dtype=np.float64)
    if m.shape != (2, 3) or not np.isfinite(m).all():
        raise ValueError(f"matrix must be a finite (2, 3) array, got shape {m.shape}")
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    h, w = image.shape[:2]
    if 0.0 < scale < _PRESHRINK_BELOW:
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        rx, ry = new_w / w, new_h / h
        # INTER_AREA maps pixel centres as x_small = (x + 0.5)·rx − 0.5.
        lin = m[:, :2] @ np.diag([1.0 / rx, 1.0 / ry])
        shift = m[:, 2] + m[:, :2] @ np.array([0.5 / rx - 0.5, 0.5 / ry - 0.5])
        m = np.hstack([lin, shift[:, None]])
    out = cv2.warpAffine(
        image,
        m,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return np.ascontiguousarray(out)


def centre_crop(image: np.ndarray, fraction: float = 1.0, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The central square of side ``fraction · min(H, W)``, resized to ``size × size`` RGB.

    The fallback when no face is found. ``fraction=1`` keeps the largest centred square
    (right for loose face crops such as CFP). On LFW deep-funneled 250×250 images ``0.53``
    gives the face the template's scale (mean over 60 faces, std 0.05), the face then
    sitting about 7 px higher than the template puts it.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    cv2 = _cv2()
    image = as_rgb_image(image)
    h, w = image.shape[:2]
    side = max(1, round(min(h, w) * fraction))
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(crop, (size, size), interpolation=interp))
