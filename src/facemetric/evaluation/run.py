"""``facemetric eval`` and ``facemetric visualize``: a model measured on a protocol.

``evaluate(model, ...)`` takes any encoder of :mod:`facemetric.inference` (or a source
``load_model`` reads: a training run or checkpoint, an ONNX file, ``"dlib"``), embeds the
images of one source (flip test as the model's contract says), scores pairs by cosine similarity
and writes ``report.md``, ``metrics.json``, ``roc.png``, ``scores.png`` (and ``cmc.png``)
with ``write_verification_report``. Exactly one source:

- ``pairs_file``: LFW's ``pairs.txt`` (View 2: its own 10 contiguous folds) or
  ``pairsDevTrain/DevTest.txt`` (View 1: ``folds`` interleaved folds), names resolved
  against ``data_root`` laid out like ``lfw-deepfunneled`` (``Name/Name_0001.jpg``);
- ``cfp_root`` + ``protocol`` (``"FF"``/``"FP"``): CFP's 10 folds; each image path
  ``cfp_root/Data/Images/<rel>`` is read from ``data_root/<rel>`` (the aligned tree keeps
  the relative layout);
- ``bin_file``: an insightface ``.bin`` (encoded images decoded here, pairs ``2i, 2i+1``,
  10 contiguous folds); ``data_root`` is not used;
- ``gallery`` + ``probe``: two identity trees (``<dir>/<identity>/<image>``, identities
  matched by folder name). Closed-set CMC of the probes whose identity is enrolled; if some
  probe identities are not in the gallery, open-set DIR at FPIR too (in the report's
  details). The verification part scores every probe against every gallery image (mated
  when the names agree; non-mated pairs subsampled at random above ``MAX_GALLERY_PAIRS``),
  in ``folds`` interleaved folds.

An aligned image may be stored as ``.png`` where the protocol names ``.jpg`` (``facemetric
align`` writes either): the other suffix is tried when the named file is missing. Pairs
whose image cannot be loaded are dropped — never scored as zeros — and the report says how
many and which images (the protocol number is then not comparable with published ones).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facemetric.data.folders import IdentityFolder, LoadFailure
from facemetric.evaluation.identification import (
    CMCCurve,
    OpenSetResult,
    cmc_curve,
    open_set_identification,
)
from facemetric.evaluation.protocols import (
    PairList,
    load_verification_bin,
    read_cfp_pairs,
    read_lfw_pairs,
    with_existing_images,
)
from facemetric.evaluation.report import ReportFiles, comparison_table, write_verification_report
from facemetric.evaluation.verification import VerificationReport, verification_report
from facemetric.evaluation.visualize import embedding_map
from facemetric.inference import (
    Encoder,
    ThresholdTable,
    all_pair_scores,
    calibrate,
    embed_files,
    embed_pairs,
    load_model,
    stack_faces,
)

logger = logging.getLogger(__name__)

#: Above this many probe × gallery pairs the non-mated ones are subsampled.
MAX_GALLERY_PAIRS = 2_000_000
#: Failed images listed by name in the report (all are counted).
_LISTED_FAILURES = 20


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate`` measured and wrote.

    ``report`` covers the scored pairs (``num_pairs − dropped_pairs`` of them);
    ``failures`` are the images that could not be loaded.
    """

    name: str
    report: VerificationReport
    files: ReportFiles
    num_pairs: int
    dropped_pairs: int
    num_images: int
    failures: tuple[LoadFailure, ...]
    embed_seconds: float
    cmc: CMCCurve | None = None
    open_set: OpenSetResult | None = None

    def summary(self) -> str:
        """A markdown table of the metrics plus where the files are."""
        lines = [comparison_table({self.name: self.report}).rstrip()]
        if self.cmc is not None:
            lines.append(
                f"CMC: rank-1 {100 * self.cmc.rank1:.2f}%, rank-5 {100 * self.cmc.rank5:.2f}%,"
                f" rank-10 {100 * self.cmc.rank10:.2f}% ({self.cmc.probe_ranks.shape[0]} probes)"
            )
        if self.open_set is not None:
            dirs = ", ".join(
                f"{f:g}: " + ("—" if d is None else f"{100 * d:.2f}%")
                for f, d in self.open_set.dir_at_fpir.items()
            )
            lines.append(
                f"open set ({self.open_set.num_mated} mated, {self.open_set.num_nonmated} "
                f"non-mated probes) DIR@FPIR {dirs}"
            )
        rate = self.num_images / max(self.embed_seconds, 1e-9)
        lines.append(f"{self.num_images} images embedded in {self.embed_seconds:.1f} s "
                     f"({rate:.1f} img/s)")
        if self.failures:
            lines.append(
                f"WARNING: {len(self.failures)} image(s) could not be loaded; "
                f"{self.dropped_pairs} of {self.num_pairs} pairs were dropped (see report.md)"
            )
        lines.append(f"report: {self.files.markdown}")
        return "\n".join(lines)


def cfp_pairs_in(cfp_root: str | os.PathLike[str], protocol: str,
                 image_root: str | os.PathLike[str]) -> PairList:
    """CFP's ``protocol`` pairs with each ``cfp_root/Data/Images/<rel>`` mapped to
    ``image_root/<rel>`` (an aligned copy of the tree)."""
    root = Path(os.path.normpath(os.path.abspath(cfp_root)))
    pairs = read_cfp_pairs(root, protocol)
    images = root / "Data" / "Images"
    target = Path(image_root)

    def move(p: Path) -> Path:
        try:
            rel = Path(os.path.abspath(p)).relative_to(images)
        except ValueError as err:
            raise ValueError(f"CFP image {p} is not under {images}") from err
        return target / rel

    return PairList(tuple(move(p) for p in pairs.path_a), tuple(move(p) for p in pairs.path_b),
                    pairs.is_same, pairs.fold)


def _decode(data: bytes, where: str) -> np.ndarray | LoadFailure:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy
    except Exception as exc:  # PIL signals damage with many exception types
        return LoadFailure(Path(where), f"undecodable image ({type(exc).__name__}: {exc})")


def _failure_details(failures: tuple[LoadFailure, ...]) -> dict[str, Any]:
    if not failures:
        return {}
    listed = {str(f.path): f.reason for f in failures[:_LISTED_FAILURES]}
    return {"failed_images": len(failures), "failed_examples": listed}


def _pair_source(
    pairs_file: Path | None, cfp_root: Path | None, protocol: str,
    data_root: Path | None, folds: int,
) -> tuple[str, PairList]:
    if data_root is None:
        raise ValueError("data_root (--data) is needed: the folder of aligned images")
    if not Path(data_root).is_dir():
        raise FileNotFoundError(f"image folder {data_root} does not exist")
    if pairs_file is not None:
        pairs = read_lfw_pairs(pairs_file, data_root, folds)
        return f"LFW {Path(pairs_file).stem}", with_existing_images(pairs)
    assert cfp_root is not None
    return f"CFP-{protocol}", with_existing_images(cfp_pairs_in(cfp_root, protocol, data_root))


def _gallery_pairs(
    scores: np.ndarray, mated: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Flattened probe × gallery scores and labels, non-mated ones subsampled so that at
    most ``MAX_GALLERY_PAIRS`` remain; also the number of non-mated pairs left out."""
    s, y = scores.reshape(-1).astype(np.float64), mated.reshape(-1)
    if s.shape[0] <= MAX_GALLERY_PAIRS:
        return s, y, 0
    pos = np.flatnonzero(y)
    neg = np.flatnonzero(~y)
    keep_neg = max(1, MAX_GALLERY_PAIRS - pos.shape[0])
    rng = np.random.default_rng(seed)
    chosen = np.sort(np.r_[pos, rng.choice(neg, size=min(keep_neg, neg.shape[0]),
                                           replace=False)])
    return s[chosen], y[chosen], int(neg.shape[0] - min(keep_neg, neg.shape[0]))


def _folder_embeddings(
    encoder: Encoder, root: Path, batch_size: int, workers: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, tuple[LoadFailure, ...]]:
    folder = IdentityFolder(root)
    if len(folder) == 0:
        raise ValueError(f"no images under {root}")
    paths = [p for p, _ in folder.samples]
    names = np.array([folder.classes[y] for _, y in folder.samples])
    res = embed_files(encoder, paths, batch_size=batch_size, workers=workers, progress=progress)
    return res.embeddings[res.ok], names[res.ok], res.failures


def as_encoder(
    model: Encoder | str | os.PathLike[str], flip: bool | None = None, device: str = "cpu"
) -> Encoder:
    """``model`` itself, or the encoder ``load_model`` reads from it; ``flip`` overrides
    the flip test of a model loaded here and must agree with a given encoder's contract."""
    if isinstance(model, Encoder):
        if flip is not None and flip != model.contract.flip_test:
            raise ValueError(
                f"flip={flip} but the encoder's contract has flip_test="
                f"{model.contract.flip_test}: load the model with flip_test={flip}"
            )
        return model
    return load_model(model, device=device, flip_test=flip)


def model_title(encoder: Encoder) -> str:
    """``backbone step N`` (or the source) for report titles."""
    c = encoder.contract
    step = c.extra.get("step")
    return f"{c.backbone} step {step}" if step is not None else f"{c.backbone} ({c.source})"


def evaluate(
    model: Encoder | str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    pairs_file: str | os.PathLike[str] | None = None,
    cfp_root: str | os.PathLike[str] | None = None,
    protocol: str = "FP",
    bin_file: str | os.PathLike[str] | None = None,
    gallery: str | os.PathLike[str] | None = None,
    probe: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str],
    flip: bool | None = None,
    folds: int = 10,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 1,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on one source (module docstring) and write the report.

    ``flip=None`` keeps the model's own flip-test setting.

    Raises:
        ValueError: not exactly one source, a missing ``data_root``, no scorable pair.
        FileNotFoundError: a missing checkpoint, pairs file or folder.
    """
    sources = {
        "pairs_file": pairs_file is not None,
        "cfp_root": cfp_root is not None,
        "bin_file": bin_file is not None,
        "gallery+probe": gallery is not None or probe is not None,
    }
    if sum(sources.values()) != 1:
        raise ValueError(
            "give exactly one source: pairs_file, cfp_root, bin_file or gallery+probe "
            f"(got {[k for k, v in sources.items() if v] or 'none'})"
        )
    if (gallery is None) != (probe is None):
        raise ValueError("gallery and probe go together: give both folders")
    encoder = as_encoder(model, flip, device)
    contract = encoder.contract
    cmc: CMCCurve | None = None
    open_set: OpenSetResult | None = None
    extra: dict[str, Any] = {"model": contract.to_dict(), "flip_test": contract.flip_test}
    started = time.perf_counter()

    if bin_file is not None:
        data = load_verification_bin(bin_file)
        decoded = [_decode(b, f"{bin_file}#{i}") for i, b in enumerate(data.images)]
        failures = tuple(d for d in decoded if isinstance(d, LoadFailure))
        ok = np.array([not isinstance(d, LoadFailure) for d in decoded], dtype=bool)
        arrays = [d for d in decoded if isinstance(d, np.ndarray)]
        emb = np.full((len(decoded), 1), np.nan, dtype=np.float32)
        if arrays:
            good = encoder.embed_faces(stack_faces(arrays, contract), batch_size=batch_size)
            emb = np.full((len(decoded), good.shape[1]), np.nan, dtype=np.float32)
            emb[ok] = good
        ea, eb = emb[0::2].astype(np.float64), emb[1::2].astype(np.float64)
        scores = np.einsum("ij,ij->i", ea, eb)
        is_same, fold = data.is_same, data.fold
        name = f"{Path(bin_file).stem} (.bin)"
        num_images = len(decoded)
    elif gallery is not None and probe is not None:
        g_emb, g_names, g_fail = _folder_embeddings(
            encoder, Path(gallery), batch_size, workers, progress)
        p_emb, p_names, p_fail = _folder_embeddings(
            encoder, Path(probe), batch_size, workers, progress)
        failures = g_fail + p_fail
        if len(g_emb) == 0 or len(p_emb) == 0:
            raise ValueError("no loadable image in the gallery or the probe folder")
        enrolled = np.isin(p_names, g_names)
        if enrolled.any():
            cmc = cmc_curve(g_emb, g_names, p_emb[enrolled], p_names[enrolled])
        if enrolled.any() and not enrolled.all():
            open_set = open_set_identification(g_emb, g_names, p_emb, p_names)
            extra["open_set"] = {
                "mated_probes": open_set.num_mated,
                "nonmated_probes": open_set.num_nonmated,
                "rank1_rate": open_set.rank1_rate,
                "dir_at_fpir": {str(f): d for f, d in open_set.dir_at_fpir.items()},
            }
        sim = p_emb.astype(np.float64) @ g_emb.astype(np.float64).T
        scores, is_same, left_out = _gallery_pairs(sim, p_names[:, None] == g_names[None, :])
        if left_out:
            extra["nonmated_pairs_left_out"] = left_out
        fold = np.arange(scores.shape[0], dtype=np.int64) % folds
        extra["gallery"] = {"images": len(g_emb), "identities": len(set(g_names.tolist()))}
        extra["probe"] = {"images": len(p_emb), "enrolled": int(enrolled.sum())}
        name = f"gallery {Path(gallery).name} / probe {Path(probe).name}"
        num_images = len(g_emb) + len(p_emb) + len(failures)
    else:
        name, pairs = _pair_source(
            None if pairs_file is None else Path(pairs_file),
            None if cfp_root is None else Path(cfp_root),
            protocol, None if data_root is None else Path(data_root), folds,
        )
        embedded = embed_pairs(encoder, pairs, batch_size=batch_size, workers=workers,
                               progress=progress)
        failures = embedded.failures
        scores, is_same, fold = embedded.scores(), pairs.is_same, pairs.fold
        num_images = len(embedded.images)
    embed_seconds = time.perf_counter() - started

    valid = np.isfinite(scores)
    dropped = int((~valid).sum())
    if not valid.any():
        raise ValueError(f"{name}: no pair could be scored ({len(failures)} images failed)")
    if dropped:
        logger.warning("%s: %d of %d pairs dropped (unloadable images)", name, dropped,
                       len(scores))
    extra.update(_failure_details(failures))
    extra["dropped_pairs"] = dropped
    extra["embed_seconds"] = round(embed_seconds, 3)
    extra["images"] = num_images
    title = f"{name} — {model_title(encoder)}"
    s, y, f = scores[valid], np.asarray(is_same)[valid], np.asarray(fold)[valid]
    report = verification_report(s, y, f)
    files = write_verification_report(out_dir, title, s, y, report, extra=extra, cmc=cmc)
    return EvalResult(
        name=title, report=report, files=files, num_pairs=len(scores), dropped_pairs=dropped,
        num_images=num_images, failures=tuple(failures), embed_seconds=embed_seconds,
        cmc=cmc, open_set=open_set,
    )


def visualize_folder(
    model: Encoder | str | os.PathLike[str],
    data_root: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    max_identities: int | None = 20,
    max_images_per_identity: int | None = None,
    method: str = "auto",
    flip: bool | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, tuple[LoadFailure, ...]]:
    """Embed a ``root/<identity>/<image>`` tree and draw its 2-D map (``embedding_map``).

    ``max_identities`` keeps the identities with the most images (ties by name), so the map
    shows clusters rather than singletons; ``max_images_per_identity`` caps each (first in
    natural file order). Unloadable images are left out and returned. Returns the PNG path.
    """
    if max_identities is not None and max_identities < 1:
        raise ValueError(f"max_identities must be at least 1, got {max_identities}")
    if max_images_per_identity is not None and max_images_per_identity < 1:
        raise ValueError("max_images_per_identity must be at least 1")
    folder = IdentityFolder(data_root)
    if len(folder) == 0:
        raise ValueError(f"no images under {data_root}")
    counts = folder.class_counts
    order = sorted(range(len(folder.classes)), key=lambda c: (-int(counts[c]), folder.classes[c]))
    chosen = set(order if max_identities is None else order[:max_identities])
    paths: list[Path] = []
    names: list[str] = []
    taken: dict[int, int] = {}
    for path, label in folder.samples:
        if label not in chosen:
            continue
        if max_images_per_identity is not None and taken.get(label, 0) >= max_images_per_identity:
            continue
        taken[label] = taken.get(label, 0) + 1
        paths.append(path)
        names.append(folder.classes[label])
    encoder = as_encoder(model, flip)
    res = embed_files(encoder, paths, batch_size=batch_size, progress=progress)
    ok = res.ok
    if ok.sum() < 2:
        raise ValueError(f"fewer than two loadable images under {data_root}")
    png = embedding_map(res.embeddings[ok], np.array(names)[ok], out_path, method=method,
                        seed=seed, title=model_title(encoder))
    return png, res.failures


__all__ = [
    "MAX_GALLERY_PAIRS",
    "EvalResult",
    "as_encoder",
    "calibrate_model",
    "cfp_pairs_in",
    "evaluate",
    "model_title",
    "visualize_folder",
]


def calibrate_model(
    model: Encoder | str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    pairs_file: str | os.PathLike[str] | None = None,
    cfp_root: str | os.PathLike[str] | None = None,
    protocol: str = "FP",
    folder: str | os.PathLike[str] | None = None,
    people_file: str | os.PathLike[str] | None = None,
    fars: Sequence[float] | None = None,
    min_false_accepts: int = 1,
    batch_size: int = 64,
    workers: int = 1,
    progress: bool = True,
) -> ThresholdTable:
    """The FAR → threshold table of ``model`` on a labelled verification set.

    Sources (exactly one): a pairs file (``pairs_file`` + ``data_root``, LFW format), CFP
    (``cfp_root`` + ``protocol`` + ``data_root``), or a labelled ``folder`` of aligned faces
    (``<folder>/<identity>/<image>``, optionally restricted by an LFW ``people_file``) whose
    *every* pair of images is compared — genuine when the identities agree, impostor
    otherwise — which resolves far lower FARs than a pair list (5,000 images give about
    12.5 million impostor comparisons). See :mod:`facemetric.inference.calibration`.
    """
    encoder = as_encoder(model)
    given = [pairs_file is not None, cfp_root is not None, folder is not None]
    if sum(given) != 1:
        raise ValueError("calibrate from exactly one source: pairs_file, cfp_root or folder")
    if folder is not None:
        ds = IdentityFolder(folder, people_file=people_file)
        if len(ds) == 0:
            raise ValueError(f"no images under {folder}")
        paths = [p for p, _ in ds.samples]
        labels = np.array([y for _, y in ds.samples])
        res = embed_files(encoder, paths, batch_size=batch_size, workers=workers,
                          progress=progress)
        genuine, impostor = all_pair_scores(res.embeddings[res.ok], labels[res.ok])
        people = f", people {Path(people_file).name}" if people_file is not None else ""
        source = f"all pairs of {int(res.ok.sum())} images in {folder}{people}"
    else:
        name, pairs = _pair_source(
            None if pairs_file is None else Path(pairs_file),
            None if cfp_root is None else Path(cfp_root),
            protocol, None if data_root is None else Path(data_root), 10,
        )
        emb = embed_pairs(encoder, pairs, batch_size=batch_size, workers=workers,
                          progress=progress)
        scores = emb.scores()
        ok = np.isfinite(scores)
        same = np.asarray(pairs.is_same, dtype=bool)
        genuine, impostor = scores[ok & same], scores[ok & ~same]
        source = f"{name} ({int(ok.sum())} of {len(scores)} pairs scored)"
    return calibrate(impostor, encoder.contract.fingerprint(), genuine_scores=genuine,
                     fars=fars, source=source, min_false_accepts=min_false_accepts)
