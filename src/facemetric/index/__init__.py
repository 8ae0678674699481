"""Embedding indexes shared by global hard mining and the gallery.

- :class:`EmbeddingIndex`: identity centroids (or images) of a training set and their
  most confusable identities (global hard mining, :mod:`facemetric.miners.global_index`).
- :class:`TemplateIndex`: a gallery's unit templates with template and person ids; add and
  remove without rebuilds, top-k templates or top-k persons (max or mean cosine), exact or
  through faiss HNSW/IVF, float32/float16/int8 storage.
- :func:`knn_table`: k-nearest-neighbour tables of up to millions of vectors, exact or an
  IVF join with ``nprobe`` chosen by measured recall.
- :mod:`facemetric.index.rerank`: retrieval post-processing of a shortlist — average and
  α-weighted query expansion, database-side augmentation, k-reciprocal re-ranking.
"""

from facemetric.index.identity import EmbeddingIndex
from facemetric.index.knn import KnnTable, knn_table
from facemetric.index.rerank import (
    AlphaQueryExpansion,
    AverageQueryExpansion,
    DatabaseAugmentation,
    KReciprocalReranking,
    MatrixDatabase,
    PostProcessing,
    Shortlist,
    TemplateDatabase,
)
from facemetric.index.templates import Hits, TemplateIndex

__all__ = [
    "AlphaQueryExpansion",
    "AverageQueryExpansion",
    "DatabaseAugmentation",
    "EmbeddingIndex",
    "Hits",
    "KReciprocalReranking",
    "KnnTable",
    "MatrixDatabase",
    "PostProcessing",
    "Shortlist",
    "TemplateDatabase",
    "TemplateIndex",
    "knn_table",
]
