"""Evaluation from arrays (scores, labels, embeddings), never from models.

- ``verification``: 1:1 pairs — k-fold accuracy, ROC, AUC, EER, TAR@FAR.
- ``identification``: 1:N — closed-set CMC, open-set DIR at FPIR, gallery/probe splits.
- ``retrieval``: precision@1, R-precision, MAP@R, recall@k, mAP, in bounded memory, with
  optional retrieval post-processing (:mod:`facemetric.index.rerank`).
- ``clustering``: NMI, AMI, pairwise and BCubed scores; k-means, threshold and
  average-linkage clustering of embeddings.
- ``protocols``: LFW, CFP and ``.bin`` pair lists.

``facemetric.evaluation.run`` (``evaluate``, ``visualize_folder``) is the bridge from a model
(any :mod:`facemetric.inference` encoder) to these arrays; it is not imported here, so that
importing the metrics loads no model code.
"""

from facemetric.evaluation.clustering import (
    ClusteringReport,
    KMeansResult,
    PrecisionRecallF,
    adjusted_mutual_info,
    agglomerative_clustering,
    bcubed_scores,
    clustering_report,
    kmeans,
    normalized_mutual_info,
    pairwise_scores,
    threshold_clustering,
)
from facemetric.evaluation.identification import (
    CMCCurve,
    GalleryProbeSplit,
    OpenSetResult,
    cmc_curve,
    open_set_identification,
    split_gallery_probe,
)
from facemetric.evaluation.plots import plot_cmc, plot_roc, plot_score_histograms
from facemetric.evaluation.protocols import (
    PairList,
    VerificationBin,
    load_verification_bin,
    read_cfp_pairs,
    read_lfw_pairs,
    with_existing_images,
)
from facemetric.evaluation.report import ReportFiles, comparison_table, write_verification_report
from facemetric.evaluation.retrieval import (
    RetrievalReport,
    mean_average_precision,
    retrieval_metrics,
)
from facemetric.evaluation.verification import (
    KFoldAccuracy,
    RocCurve,
    VerificationReport,
    cosine_pair_scores,
    equal_error_rate,
    interleaved_folds,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    scores_from_distances,
    tar_at_far,
    verification_report,
)
from facemetric.evaluation.visualize import (
    EmbeddingProjection,
    embedding_map,
    project_embeddings,
)

__all__ = [
    "CMCCurve",
    "ClusteringReport",
    "EmbeddingProjection",
    "GalleryProbeSplit",
    "KFoldAccuracy",
    "KMeansResult",
    "OpenSetResult",
    "PairList",
    "PrecisionRecallF",
    "ReportFiles",
    "RetrievalReport",
    "RocCurve",
    "VerificationBin",
    "VerificationReport",
    "adjusted_mutual_info",
    "agglomerative_clustering",
    "bcubed_scores",
    "clustering_report",
    "cmc_curve",
    "comparison_table",
    "cosine_pair_scores",
    "embedding_map",
    "equal_error_rate",
    "interleaved_folds",
    "kfold_accuracy",
    "kmeans",
    "load_verification_bin",
    "mean_average_precision",
    "normalized_mutual_info",
    "open_set_identification",
    "pairwise_scores",
    "plot_cmc",
    "plot_roc",
    "plot_score_histograms",
    "project_embeddings",
    "read_cfp_pairs",
    "read_lfw_pairs",
    "retrieval_metrics",
    "roc_auc",
    "roc_curve",
    "scores_from_distances",
    "split_gallery_probe",
    "tar_at_far",
    "threshold_clustering",
    "verification_report",
    "with_existing_images",
    "write_verification_report",
]
