"""Grouping photo collections by person, without labels.

A stage of its own (not part of :mod:`facemetric.evaluation`, which stays "arrays in,
metrics out" and keeps its reference clusterers; nor of :mod:`facemetric.recognizer`,
whose facade it uses): the clustering algorithms with cannot-link constraints
(:mod:`~facemetric.clustering.graph`, :mod:`~facemetric.clustering.methods`), the stateless
images → clusters call (:func:`cluster_images`, for scripts and the REST service), and the
durable, incremental collection behind ``facemetric cluster``
(:class:`PhotoCollection` with :mod:`~facemetric.clustering.state` and
:mod:`~facemetric.clustering.export`). See docs/clustering.md.
"""

from facemetric.clustering.collection import (
    PhotoCollection,
    PhotoProblem,
    UpdateReport,
    list_photos,
)
from facemetric.clustering.export import ExportFiles
from facemetric.clustering.graph import (
    DEFAULT_NEIGHBOURS,
    LINKAGES,
    AgglomerativeResult,
    Edges,
    cannot_link_violations,
    constrained_agglomerative,
    knn_edges,
    unit_float32,
)
from facemetric.clustering.images import (
    ClusteredFace,
    ClusteringResult,
    ImageProblem,
    cluster_images,
)
from facemetric.clustering.methods import (
    DEFAULT_CLUSTER_FAR,
    METHODS,
    Assignment,
    Clustering,
    ClusterOptions,
    assign_to_clusters,
    cluster_embeddings,
    hdbscan_labels,
    member_scores,
    split_cannot_link,
)
from facemetric.clustering.state import ClusterState

__all__ = [
    "DEFAULT_CLUSTER_FAR",
    "DEFAULT_NEIGHBOURS",
    "LINKAGES",
    "METHODS",
    "AgglomerativeResult",
    "Assignment",
    "ClusterOptions",
    "ClusterState",
    "ClusteredFace",
    "Clustering",
    "ClusteringResult",
    "Edges",
    "ExportFiles",
    "ImageProblem",
    "PhotoCollection",
    "PhotoProblem",
    "UpdateReport",
    "assign_to_clusters",
    "cannot_link_violations",
    "cluster_embeddings",
    "cluster_images",
    "constrained_agglomerative",
    "hdbscan_labels",
    "knn_edges",
    "list_photos",
    "member_scores",
    "split_cannot_link",
    "unit_float32",
]
