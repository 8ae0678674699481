"""Knowledge distillation's data side: the teacher's embeddings of a training set, computed
once and cached beside the aligned images (:mod:`facemetric.distillation.cache`). The
losses live in :mod:`facemetric.losses.distillation`; the training loop reads the cache
through its ``[distill]`` section."""

from facemetric.distillation.cache import (
    TEACHER_DIR,
    AlignedFaces,
    RealignedFaces,
    TeacherEmbeddings,
    TeacherInputs,
    images_digest,
    load_teacher_cache,
    teacher_cache,
)

__all__ = [
    "TEACHER_DIR",
    "AlignedFaces",
    "RealignedFaces",
    "TeacherEmbeddings",
    "TeacherInputs",
    "images_digest",
    "load_teacher_cache",
    "teacher_cache",
]
