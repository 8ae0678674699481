"""What a user opens: the exported view of a clustered collection, rewritten after every
run and decision.

- ``DIR/faces.csv``: one row per face — ``face`` id, ``photo`` (path in the folder), box
  ``left, top, right, bottom``, ``cluster`` id, ``person`` (the name, once given),
  ``clustered`` (``1``, or ``0`` for a face that fits no cluster) and ``score`` (mean cosine
  to the other faces of its cluster, empty when alone). Written atomically.
- ``DIR/clusters/<id>[_<person>]/<face>.png``: the context crop of every face of every
  cluster with at least ``min_size`` faces (or a name).
- ``DIR/contact_sheets/<id>[_<person>].png``: a grid of up to 64 of its faces, best score
  first.
- ``DIR/unclustered/<face>.png``: faces of smaller unnamed clusters.

The three folders are owned by the export: they are emptied and refilled each time.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.atomic import atomic_write
from facemetric.clustering.methods import member_scores

SHEET_MAX_FACES = 64
SHEET_COLUMNS = 8
SHEET_TILE = 96


@dataclass(frozen=True)
class ExportFiles:
    csv: Path
    clusters: Path
    contact_sheets: Path
    unclustered: Path


def folder_name(cluster: int, person: str | None) -> str:
    """``00012`` or ``00012_Ada_Lovelace`` (the name reduced to safe file characters)."""
    if not person:
        return f"{cluster:05d}"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", person).strip("._") or "person"
    return f"{cluster:05d}_{safe[:60]}"


def export_state(state: Any, min_size: int) -> ExportFiles:
    """Write the exports of ``state`` (a :class:`~facemetric.clustering.state.ClusterState`)
    (module docstring)."""
    root = Path(state.folder)
    files = ExportFiles(root / "faces.csv", root / "clusters", root / "contact_sheets",
                        root / "unclustered")
    for folder in (files.clusters, files.contact_sheets, files.unclustered):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    rows = [r for r in state.faces() if r.cluster is not None]
    arrays = state.face_arrays("WHERE cluster_id IS NOT NULL")
    scores = member_scores(arrays.embeddings, arrays.clusters) if rows else np.zeros(0)
    score_of = dict(zip(arrays.ids.tolist(), scores.tolist(), strict=True))
    sizes: dict[int, int] = {}
    for r in rows:
        sizes[r.cluster] = sizes.get(r.cluster, 0) + 1
    kept = {c for c, n in sizes.items() if n >= min_size}
    kept |= {r.cluster for r in rows if r.name}
    sheets: dict[int, list[tuple[float, int]]] = {}
    for r in rows:
        data = state.crop(r.id)
        if r.cluster in kept:
            where = files.clusters / folder_name(r.cluster, r.name)
            where.mkdir(exist_ok=True)
            sheets.setdefault(r.cluster, []).append((score_of.get(r.id, np.nan), r.id))
        else:
            where = files.unclustered
        (where / f"{r.id:07d}.png").write_bytes(data)
    names = {r.cluster: r.name for r in rows}
    for cluster, members in sheets.items():
        members.sort(key=lambda t: (-(t[0] if t[0] == t[0] else -2.0), t[1]))
        title = f"cluster {cluster}" + (f" - {names[cluster]}" if names[cluster] else "")
        png = contact_sheet([state.crop(f) for _, f in members[:SHEET_MAX_FACES]],
                            f"{title} ({len(members)} faces)")
        (files.contact_sheets / f"{folder_name(cluster, names[cluster])}.png").write_bytes(png)

    def write(handle: Any) -> None:
        text = io.StringIO()
        out = csv.writer(text)
        out.writerow(["face", "photo", "left", "top", "right", "bottom", "cluster", "person",
                      "clustered", "score"])
        for r in rows:
            s = score_of.get(r.id, np.nan)
            out.writerow([r.id, r.photo, *r.box, r.cluster, r.name or "",
                          int(r.cluster in kept), "" if s != s else f"{s:.4f}"])
        handle.write(text.getvalue().encode("utf-8"))

    atomic_write(files.csv, write)
    return files


def contact_sheet(crops: list[bytes], title: str) -> bytes:
    """A PNG grid of the given PNG crops (``SHEET_TILE`` px squares, ``SHEET_COLUMNS`` wide)
    under a one-line title."""
    from PIL import Image, ImageDraw

    cols = min(SHEET_COLUMNS, max(1, len(crops)))
    rows = (len(crops) + cols - 1) // cols
    head = 18
    sheet = Image.new("RGB", (cols * SHEET_TILE, head + rows * SHEET_TILE), (255, 255, 255))
    ImageDraw.Draw(sheet).text((4, 3), title, fill=(0, 0, 0))
    for i, data in enumerate(crops):
        tile = Image.open(io.BytesIO(data)).convert("RGB")
        tile.thumbnail((SHEET_TILE, SHEET_TILE))
        x = (i % cols) * SHEET_TILE + (SHEET_TILE - tile.width) // 2
        y = head + (i // cols) * SHEET_TILE + (SHEET_TILE - tile.height) // 2
        sheet.paste(tile, (x, y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["ExportFiles", "contact_sheet", "export_state", "folder_name"]
