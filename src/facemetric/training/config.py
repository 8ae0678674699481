"""Training configuration: typed dataclasses read from one TOML file per experiment.

``load_config(path)`` parses the file, converts every value to its field's type and checks
ranges. An unknown key raises ``ValueError`` naming it, its section and the valid keys; a
value of the wrong type raises ``ValueError`` saying which type was expected. Relative paths
(``data.root``, ``data.people_file``, ``output_dir``) are resolved against the folder of the
config file, so a config works from any working directory.

The ``[loss]`` section is open: besides ``name``, ``miner``, ``miner_params``,
``distance`` and ``margin_warmup_steps``, every key is a parameter of the loss (``scale``,
``margin`` ...); those are checked against the loss's constructor by
:func:`facemetric.training.builders.build_loss` (``load_config`` runs that check when the
loss is known). ``[[aux_loss]]`` sections (a TOML array of tables) are laid out like
``[loss]`` plus a ``weight``: each adds ``weight · ℓ_aux`` to the ``[loss]`` term
(:class:`~facemetric.losses.combined.WeightedLossSum`). See ``configs/*.toml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AMP_DTYPES = ("bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    """Where the images are: ``root/<identity>/<image>`` (see ``IdentityFolder``).

    ``people_file`` (optional) is an LFW people list selecting identities; ``folds`` picks
    folds of a View-2 list. ``verify`` decodes every image before training and drops the
    broken ones (they are reported in ``TrainResult.failures``).
    """

    root: Path = Path("data")
    people_file: Path | None = None
    folds: list[int] | None = None
    image_size: int = 112
    min_images: int = 1
    num_workers: int = 0
    verify: bool = True


@dataclass
class AugmentConfig:
    """Training augmentation (``facemetric.data.transforms.train_transform``).

    ``pose_*``: :class:`facemetric.data.transforms.RandomPose` (yaw and roll in degrees,
    shift as a fraction of the side), applied with probability ``pose_prob``.
    """

    flip: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])
    padding: int = 0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    blur_prob: float = 0.0
    grayscale_prob: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.5])
    occlusion_prob: float = 0.0
    occlusion_area: list[float] = field(default_factory=lambda: [0.05, 0.25])
    downscale_prob: float = 0.0
    downscale_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    jpeg_prob: float = 0.0
    jpeg_quality: list[int] = field(default_factory=lambda: [10, 60])
    pose_prob: float = 0.0
    pose_yaw: float = 40.0
    pose_roll: float = 10.0
    pose_scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    pose_shift: float = 0.1


@dataclass
class ModelConfig:
    """A backbone of ``facemetric.models`` (or ``small_cnn``) and its own options."""

    name: str = "mobilefacenet"
    embedding_size: int = 512
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """A loss by name; ``params`` are its keyword arguments (the other keys of ``[loss]``).

    ``miner`` names a miner for a pair loss (``miner_params`` its arguments); ``distance``
    names the distance shared by the loss and its miner (``cosine``, ``euclidean`` ...).
    ``margin_warmup_steps = N > 0`` wraps a margin loss's margin in
    :class:`~facemetric.losses.margins.WarmupMargin` (softmax at step 0, the full margin
    from step ``N``). ``memory_size = M > 0`` wraps a pair loss (N-pair, contrastive) in
    :class:`~facemetric.losses.pair.memory.CrossBatchMemory`: from step
    ``memory_start_step`` on, the loss of the batch against the last ``M`` embeddings, times
    ``memory_weight``, is added.
    """

    name: str = "arcface"
    miner: str | None = None
    miner_params: dict[str, Any] = field(default_factory=dict)
    distance: str | None = None
    margin_warmup_steps: int = 0
    memory_size: int = 0
    memory_start_step: int = 0
    memory_weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuxLossConfig(LossConfig):
    """One ``[[aux_loss]]`` section: a loss laid out as ``[loss]`` whose value, times
    ``weight``, is added to the ``[loss]`` term (e.g. ArcFace beside N-pair). A pair loss
    here needs P×K batches like a pair ``[loss]``; a classifier loss gets its own centres
    over the same classes. ``name`` has no default here: a section names its loss."""

    name: str = ""
    weight: float = 1.0


@dataclass
class OptimizerConfig:
    """SGD (``momentum``, ``nesterov``) or AdamW (``betas``). Weight decay applies to
    weights of two or more dimensions (convolutions, linear layers, class centres), not to
    biases and normalisation parameters unless ``decay_all`` is set."""

    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    decay_all: bool = False


@dataclass
class ScheduleConfig:
    """Linear warm-up over ``warmup_steps`` then ``cosine`` (down to ``min_lr_ratio``·lr),
    ``step`` (×``gamma`` at each of ``milestones``, in steps) or ``constant``."""

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class BatchConfig:
    """Shuffled batches of ``size``, or P×K batches (``p`` identities × ``k`` images) when
    ``p`` and ``k`` are given — required by pair losses.

    ``min_images`` (P×K only): identities with fewer images are never drawn (``PKSampler``,
    ``HardIdentitySampler``). The default 2 skips single-image identities, which cannot form
    a positive pair; 1 draws them too, as ``k`` copies of their one image, whose positives
    then differ only by the ``[augment]`` draws (so an augmentation is required). This is a
    filter on the batches; ``[data] min_images`` filters the dataset (and a classifier
    head's classes) before.
    """

    size: int = 128
    p: int | None = None
    k: int | None = None
    min_images: int = 2

    @property
    def uses_pk(self) -> bool:
        return self.p is not None

    @property
    def effective_size(self) -> int:
        return self.p * self.k if self.p is not None and self.k is not None else self.size


@dataclass
class TrainLoopConfig:
    """Length, precision, clipping, logging and checkpointing.

    ``max_steps`` (if given) overrides ``epochs``. ``amp`` uses ``torch.autocast`` on CUDA
    with ``amp_dtype``; on CPU it is only used for ``bf16``. ``grad_clip`` is the maximum
    global gradient norm (``None``: no clipping). ``checkpoint_every`` / ``log_every`` are
    in steps; the last ``keep_checkpoints`` checkpoints are kept. ``channels_last`` stores
    the backbone's weights and the image batches in NHWC layout: the same arithmetic,
    1.47× the bare training-step throughput of a 64×64 MobileFaceNet on 2 CPU cores, 1.32×
    the whole loop's (``docs/benchmarks.md``), and the layout tensor cores want under AMP.
    ``max_skipped_steps``: a step whose gradient holds a NaN or an infinity (behind a finite
    loss) is skipped — no optimiser update — with a warning, this many times in a run; one
    more stops training with an error (0: stop at the first).
    ``ema_decay``: keep an exponential moving average of the weights with this decay
    (:class:`~facemetric.training.ema.WeightAverage`; 0: none). The checkpoints then store
    the average as ``"model"`` — what evaluation, export and ``load_model`` use — and the
    optimiser's raw weights as ``"model_raw"``, which ``--resume`` continues.
    ``cudnn_benchmark``: on CUDA, cuDNN times its convolution algorithms at the first step
    and keeps the fastest for the run's fixed input size (``torch.backends.cudnn.benchmark``,
    set for the process): 1.19× the bare IResNet-50 bf16 step at batch 128 on one H200, no
    measurable change in that host-bound loop (``docs/benchmarks.md``); the chosen
    algorithms may differ between runs, so two runs are not bit-identical (they are not on
    CUDA anyway). No effect on CPU.
    ``compile``: the loop calls the backbone through ``torch.compile`` (TorchInductor; on CPU
    it needs a C++ compiler). The same function (float rounding aside) in fused kernels:
    1.33× the bare 64×64 MobileFaceNet training step on 2 CPU cores but ~1.1× the loop's,
    after a first step that compiles for ~85 s (seconds with a warm on-disk cache;
    ``docs/training.md``). The checkpoints hold the plain module's weights, unchanged.
    """

    epochs: int = 1
    max_steps: int | None = None
    amp: bool = False
    amp_dtype: str = "bf16"
    grad_clip: float | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    device: str = "auto"
    channels_last: bool = True
    max_skipped_steps: int = 5
    ema_decay: float = 0.0
    cudnn_benchmark: bool = True
    compile: bool = False


@dataclass
class PartialFCConfig:
    """Partial FC (``facemetric.heads.PartialFC``): with ``sample_rate`` set, the classifier
    loss named in ``[loss]`` (ArcFace, CosFace, combined margin ...) keeps its margin and
    scale but each step uses only the batch's positive centres plus a uniformly sampled
    ``sample_rate`` fraction of the others; under torchrun the centres are sharded over the
    processes. Unset (the default): the plain loss.

    ``sparse_update``: the centres get a sparse gradient of the sampled rows and a lazy
    row-wise SGD step (:class:`~facemetric.training.RowSparseSGD`), so a step's optimiser
    work scales with the sample, not with the number of identities. Unset: on with
    ``[optimizer] name = "sgd"``, off with AdamW (which needs dense gradients)."""

    sample_rate: float | None = None
    sparse_update: bool | None = None


@dataclass
class MiningConfig:
    """Global hard-negative mining (``facemetric.miners.global_index``) for pair losses.

    With ``global_index`` on, P×K batches are built by ``HardIdentitySampler``: each seed
    identity brings its ``neighbours`` most confused identities (nearest centroids). The
    whole dataset is re-embedded and re-indexed every ``refresh_every`` steps (``batch_size``
    images at a time; the first refresh happens at that step, before it batches are random).
    ``per_image`` indexes images instead of identity centroids; faiss (``backend`` ``auto``
    or ``faiss``) switches to an ``approximate`` index (``ivf``/``hnsw``) above
    ``approximate_above`` vectors. An epoch makes every identity a seed once, so it has
    about ``neighbours + 1`` times as many batches as without.
    """

    global_index: bool = False
    refresh_every: int = 1000
    neighbours: int = 3
    per_image: bool = False
    batch_size: int = 256
    backend: str = "auto"
    approximate: str = "ivf"
    approximate_above: int | None = 100_000


@dataclass
class ClassTreeConfig:
    """The hierarchical triplet loss's global class tree (Ge et al. 2018; read when ``[loss]
    name`` is ``hierarchical_triplet``; see :mod:`facemetric.training.structure`).

    With ``enabled`` (the default) the whole dataset is embedded by the model (eval mode,
    ``batch_size`` images at a time) before the first step and again every
    ``refresh_every`` steps; a ``ClassTree`` is built from the class statistics (the loss's
    ``num_levels``, in its distance's units) and handed to the loss, whose margins then come
    from it, and to the batch sampler. Batches are anchor-neighbour batches:
    ``[batch] p / classes_per_anchor`` anchor classes drawn at random, each followed by its
    ``classes_per_anchor − 1`` nearest classes in the tree, ``[batch] k`` images per class.
    The tree is saved in checkpoints. ``enabled = false``: P×K batches and a batch-local tree
    each step.
    """

    enabled: bool = True
    refresh_every: int = 1000
    classes_per_anchor: int = 4
    batch_size: int = 256


@dataclass
class MagnetConfig:
    """The magnet loss's per-class k-means index (Rippel et al. 2016; read when ``[loss]
    name`` is ``magnet``; see :mod:`facemetric.training.structure`).

    With ``enabled`` (the default) the whole dataset is embedded by the model before the
    first step and again every ``refresh_every`` steps, and reclustered into
    ``clusters_per_class`` k-means clusters per class (``iterations`` Lloyd iterations at
    most). Batches are neighbourhood batches: a seed cluster and its ``[batch] p − 1``
    nearest impostor clusters, ``[batch] k`` images each; the loss gets each image's cluster
    from the index. The clusters are saved in checkpoints. ``enabled = false``: P×K batches
    and one cluster per class.
    """

    enabled: bool = True
    refresh_every: int = 1000
    clusters_per_class: int = 8
    iterations: int = 20
    batch_size: int = 256


@dataclass
class DistillConfig:
    """Knowledge distillation from a teacher encoder (``facemetric distill``; see
    ``docs/distillation.md``). Unset ``teacher``: no distillation.

    ``teacher`` is a ``facemetric.inference.load_model`` source (``"dlib"``, a run folder,
    an ``.onnx`` file). Its embeddings of every training image are computed once and cached
    under ``[data] root/.teacher`` (:mod:`facemetric.distillation.cache`; ``workers``
    processes, ``chunk`` images per resumable chunk). A teacher whose alignment template
    differs from the training images' (dlib's ``dlib150`` chips vs ``arcface112``) sees the
    original photos re-detected and warped to its template: ``photos_root`` is the tree the
    aligned images were made from (default: the ``src`` that ``align_report.json`` in
    ``[data] root`` names, with that report's detector settings).

    The objective is ``label·ℓ_[loss] + embedding·ℓ_emb + rkd_distance·ℓ_RKD-D +
    rkd_angle·ℓ_RKD-A + similarity·ℓ_sim`` (:mod:`facemetric.losses.distillation`;
    ``embedding_kind`` ``"cosine"`` or ``"l2"``; a weight of 0 drops the term, ``label = 0``
    drops the ``[loss]`` term).
    """

    teacher: str | None = None
    photos_root: Path | None = None
    workers: int = 1
    chunk: int = 128
    label: float = 1.0
    embedding: float = 1.0
    embedding_kind: str = "cosine"
    rkd_distance: float = 0.0
    rkd_angle: float = 0.0
    similarity: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.teacher is not None


def structured_loss(name: str) -> str | None:
    """``"class_tree"`` or ``"magnet"`` for the losses whose dataset-level state a config
    section controls (by the registry's name matching), else ``None``."""
    key = name.lower().replace("_", "").replace("-", "")
    key = key[: -len("loss")] if key.endswith("loss") and key != "loss" else key
    return {"hierarchicaltriplet": "class_tree", "magnet": "magnet"}.get(key)


@dataclass
class TrainConfig:
    """One experiment: ``seed``, ``output_dir`` and the sections above."""

    seed: int = 0
    output_dir: Path = Path("runs/train")
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    aux_loss: list[AuxLossConfig] = field(default_factory=list)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    class_tree: ClassTreeConfig = field(default_factory=ClassTreeConfig)
    magnet: MagnetConfig = field(default_factory=MagnetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (paths as strings): what a checkpoint stores."""
        return _plain(dataclasses.asdict(self))


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "batch": BatchConfig,
    "train": TrainLoopConfig,
    "partial_fc": PartialFCConfig,
    "mining": MiningConfig,
    "class_tree": ClassTreeConfig,
    "magnet": MagnetConfig,
    "distill": DistillConfig,
}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_config(path: str | os.PathLike[str], *, check_loss: bool = True) -> TrainConfig:
    """Read a TOML experiment file into a :class:`TrainConfig` (checked; see module doc).

    With ``check_loss`` the ``[loss]`` section is validated by building the loss once
    (unknown loss, miner or distance names and unknown parameters are reported here rather
    than when training starts).

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid TOML, an unknown key, a value of the wrong type or out of range.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from err
    config = config_from_dict(raw, base_dir=path.parent, source=str(path))
    if check_loss:
        from facemetric.training.builders import check_loss_config

        try:
            check_loss_config(config.loss, config.model.embedding_size)
        except ValueError as err:
            raise ValueError(f"{path}: [loss] {err}") from err
        for i, aux in enumerate(config.aux_loss, 1):
            try:
                check_loss_config(aux, config.model.embedding_size)
            except ValueError as err:
                raise ValueError(f"{path}: [[aux_loss]] {i}: {err}") from err
    return config


def config_from_dict(
    raw: dict[str, Any], *, base_dir: Path | None = None, source: str = "config"
) -> TrainConfig:
    """Build and check a :class:`TrainConfig` from nested dictionaries (parsed TOML or
    ``TrainConfig.to_dict()``). Relative paths are resolved against ``base_dir`` if given."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a table, got {type(raw).__name__}")
    top_fields = {"seed", "output_dir"}
    valid = sorted(top_fields | set(_SECTIONS) | {"aux_loss"})
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(TrainConfig)
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: [{key}] must be a table, got {value!r}")
            kwargs[key] = _section(key, value, source)
        elif key == "aux_loss":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ValueError(f"{source}: aux_loss must be an array of tables "
                                 f"([[aux_loss]] sections), got {value!r}")
            kwargs[key] = [_section(key, v, f"{source}: [[aux_loss]] {i + 1}")
                           for i, v in enumerate(value)]
        elif key in top_fields:
            kwargs[key] = _convert(value, hints[key], f"{source}: {key}")
        else:
            raise ValueError(f"{source}: unknown key {key!r}; valid top-level keys: {valid}")
    config = TrainConfig(**kwargs)
    if base_dir is not None:
        config.output_dir = _resolve(config.output_dir, base_dir)
        config.data.root = _resolve(config.data.root, base_dir)
        if config.data.people_file is not None:
            config.data.people_file = _resolve(config.data.people_file, base_dir)
        if config.distill.photos_root is not None:
            config.distill.photos_root = _resolve(config.distill.photos_root, base_dir)
    check_config(config, source)
    return config


def _resolve(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _section(name: str, table: dict[str, Any], source: str) -> Any:
    cls = AuxLossConfig if name == "aux_loss" else _SECTIONS[name]
    open_table = issubclass(cls, LossConfig)  # every other key is a loss parameter
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{source}: [{name}] {key}"
        if key in names and key != "params":
            kwargs[key] = _convert(value, hints[key], where)
        elif open_table and key == "params" and isinstance(value, dict):
            params.update(value)  # the layout of TrainConfig.to_dict()
        elif open_table:
            if isinstance(value, dict):
                raise ValueError(
                    f"{where}: a loss parameter must be a value, not a table "
                    f"(the only sub-table of [{name}] is [{name}.miner_params])"
                )
            params[key] = value
        else:
            raise ValueError(
                f"{source}: unknown key {key!r} in [{name}]; valid keys: {sorted(names)}"
            )
    if open_table:
        kwargs["params"] = params
    return cls(**kwargs)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               Path: "a path string"}


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, Path, X | None, list[X],
    dict[str, Any]); ``ValueError`` naming ``where`` otherwise."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(
                f"{where}: expected a list of {_TYPE_WORDS[item][2:]}s, got {value!r} "
                f"({type(value).__name__})"
            )
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r} ({type(value).__name__})")
        return dict(value)
    ok = (
        (hint is bool and isinstance(value, bool))
        or (hint is int and isinstance(value, int) and not isinstance(value, bool))
        or (hint is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (hint in (str, Path) and isinstance(value, str))
    )
    if not ok:
        raise ValueError(
            f"{where}: expected {_TYPE_WORDS.get(hint, hint)}, got {value!r} "
            f"({type(value).__name__})"
        )
    if hint is float:
        return float(value)
    if hint is Path:
        return Path(value)
    return value


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_config(config: TrainConfig, source: str = "config") -> None:
    """Range and consistency checks (``ValueError`` with the offending key)."""
    s = source
    d, a, m, o, sc, b, t = (
        config.data, config.augment, config.model, config.optimizer, config.schedule,
        config.batch, config.train,
    )
    _need(config.seed >= 0, f"{s}: seed must be >= 0, got {config.seed}")
    _need(d.image_size >= 8, f"{s}: [data] image_size must be >= 8, got {d.image_size}")
    _need(d.min_images >= 1, f"{s}: [data] min_images must be >= 1, got {d.min_images}")
    _need(d.num_workers >= 0, f"{s}: [data] num_workers must be >= 0, got {d.num_workers}")
    for key in ("crop_scale", "crop_ratio", "blur_sigma", "occlusion_area", "downscale_scale",
                "jpeg_quality", "pose_scale"):
        pair = getattr(a, key)
        _need(
            len(pair) == 2 and 0 < pair[0] <= pair[1],
            f"{s}: [augment] {key} must be [min, max] with 0 < min <= max, got {pair}",
        )
    for key in ("crop_scale", "occlusion_area", "downscale_scale"):
        _need(getattr(a, key)[1] <= 1.0, f"{s}: [augment] {key} max must be <= 1")
    _need(
        all(float(q) == int(q) for q in a.jpeg_quality) and a.jpeg_quality[0] >= 1
        and a.jpeg_quality[1] <= 95,
        f"{s}: [augment] jpeg_quality must be integers [min, max] in [1, 95], got "
        f"{a.jpeg_quality}",
    )
    _need(a.padding >= 0, f"{s}: [augment] padding must be >= 0")
    for key in ("brightness", "contrast", "saturation", "blur_prob", "grayscale_prob",
                "occlusion_prob", "downscale_prob", "jpeg_prob", "pose_prob"):
        value = getattr(a, key)
        _need(0.0 <= value <= 1.0, f"{s}: [augment] {key} must be in [0, 1], got {value}")
    _need(0.0 <= a.pose_yaw < 90.0, f"{s}: [augment] pose_yaw must be in [0, 90) degrees, got "
          f"{a.pose_yaw}")
    _need(0.0 <= a.pose_roll <= 180.0, f"{s}: [augment] pose_roll must be in [0, 180] degrees, "
          f"got {a.pose_roll}")
    _need(0.0 <= a.pose_shift < 1.0, f"{s}: [augment] pose_shift must be in [0, 1) of the "
          f"side, got {a.pose_shift}")
    _need(m.embedding_size >= 1, f"{s}: [model] embedding_size must be >= 1")
    for where, section in ((f"{s}: [loss]", config.loss),
                           *((f"{s}: [[aux_loss]] {i}:", aux)
                             for i, aux in enumerate(config.aux_loss, 1))):
        _need(bool(section.name), f"{where} name is required")
        for key in ("margin_warmup_steps", "memory_size", "memory_start_step"):
            _need(getattr(section, key) >= 0,
                  f"{where} {key} must be >= 0, got {getattr(section, key)}")
        _need(math.isfinite(section.memory_weight) and section.memory_weight > 0,
              f"{where} memory_weight must be a finite number > 0, got {section.memory_weight}")
        for key, default in (("memory_start_step", 0), ("memory_weight", 1.0)):
            _need(section.memory_size > 0 or getattr(section, key) == default,
                  f"{where} {key} is set without memory_size: set the memory's size or "
                  f"remove {key}")
    for i, aux in enumerate(config.aux_loss, 1):
        _need(math.isfinite(aux.weight) and aux.weight > 0,
              f"{s}: [[aux_loss]] {i}: weight must be a finite number > 0, got {aux.weight} "
              "(remove the section to drop the term)")
    if config.aux_loss:
        _need(config.partial_fc.sample_rate is None,
              f"{s}: [[aux_loss]] does not combine with [partial_fc] (its sharded centres are "
              "the whole objective there); remove one of them")
        _need(structured_loss(config.loss.name) is None
              and not any(structured_loss(a.name) for a in config.aux_loss),
              f"{s}: [[aux_loss]] does not combine with the hierarchical triplet or magnet "
              "loss (their dataset-level state is attached to the one loss)")
    _need(o.name in OPTIMIZERS, f"{s}: [optimizer] name must be one of {OPTIMIZERS}, got "
          f"{o.name!r}")
    _need(o.lr > 0 and math.isfinite(o.lr), f"{s}: [optimizer] lr must be > 0, got {o.lr}")
    _need(o.weight_decay >= 0, f"{s}: [optimizer] weight_decay must be >= 0")
    _need(0 <= o.momentum < 1, f"{s}: [optimizer] momentum must be in [0, 1)")
    _need(len(o.betas) == 2 and all(0 <= x < 1 for x in o.betas),
          f"{s}: [optimizer] betas must be two numbers in [0, 1), got {o.betas}")
    _need(sc.name in SCHEDULES, f"{s}: [schedule] name must be one of {SCHEDULES}, got "
          f"{sc.name!r}")
    _need(sc.warmup_steps >= 0, f"{s}: [schedule] warmup_steps must be >= 0")
    _need(0 <= sc.min_lr_ratio <= 1, f"{s}: [schedule] min_lr_ratio must be in [0, 1]")
    _need(0 < sc.gamma <= 1, f"{s}: [schedule] gamma must be in (0, 1]")
    _need(sc.milestones == sorted(sc.milestones) and all(x > 0 for x in sc.milestones),
          f"{s}: [schedule] milestones must be increasing positive steps, got {sc.milestones}")
    _need((b.p is None) == (b.k is None), f"{s}: [batch] give both p and k, or neither")
    if b.p is not None and b.k is not None:
        _need(b.p >= 2 and b.k >= 2, f"{s}: [batch] p and k must be >= 2, got p={b.p}, k={b.k}")
        _need(b.min_images >= 1, f"{s}: [batch] min_images must be >= 1, got {b.min_images}")
    else:
        _need(b.min_images == BatchConfig.min_images,
              f"{s}: [batch] min_images applies to P×K batches only: set p and k, or remove it")
        _need(b.size >= 2, f"{s}: [batch] size must be >= 2, got {b.size}")
    _need(t.epochs >= 1, f"{s}: [train] epochs must be >= 1, got {t.epochs}")
    _need(t.max_steps is None or t.max_steps >= 1, f"{s}: [train] max_steps must be >= 1")
    _need(t.amp_dtype in AMP_DTYPES, f"{s}: [train] amp_dtype must be one of {AMP_DTYPES}, "
          f"got {t.amp_dtype!r}")
    _need(t.grad_clip is None or t.grad_clip > 0, f"{s}: [train] grad_clip must be > 0")
    _need(t.checkpoint_every >= 1, f"{s}: [train] checkpoint_every must be >= 1")
    _need(t.keep_checkpoints >= 1, f"{s}: [train] keep_checkpoints must be >= 1")
    _need(t.log_every >= 1, f"{s}: [train] log_every must be >= 1")
    _need(0.0 <= t.ema_decay < 1.0,
          f"{s}: [train] ema_decay must lie in [0, 1) (0: no average), got {t.ema_decay}")
    _need(t.max_skipped_steps >= 0,
          f"{s}: [train] max_skipped_steps must be >= 0, got {t.max_skipped_steps}")
    _need(t.device in DEVICES, f"{s}: [train] device must be one of {DEVICES}, got "
          f"{t.device!r}")
    rate = config.partial_fc.sample_rate
    _need(not (config.partial_fc.sparse_update and config.optimizer.name != "sgd"),
          f"{s}: [partial_fc] sparse_update needs [optimizer] name = \"sgd\" (the row-wise "
          f"step is SGD's); got {config.optimizer.name!r} — drop sparse_update to train with it")
    _need(rate is None or 0 < rate <= 1,
          f"{s}: [partial_fc] sample_rate must be in (0, 1], got {rate}")
    mi = config.mining
    if mi.global_index:
        _need(b.p is not None and b.k is not None,
              f"{s}: [mining] global_index needs P×K batches: set [batch] p and k")
        _need(b.p is None or 0 <= mi.neighbours < b.p,
              f"{s}: [mining] neighbours must be in [0, p), got {mi.neighbours}")
    _need(mi.refresh_every >= 1, f"{s}: [mining] refresh_every must be >= 1")
    _need(mi.batch_size >= 1, f"{s}: [mining] batch_size must be >= 1")
    _need(mi.backend in ("auto", "faiss", "torch"),
          f"{s}: [mining] backend must be auto, faiss or torch, got {mi.backend!r}")
    _need(mi.approximate in ("ivf", "hnsw"),
          f"{s}: [mining] approximate must be ivf or hnsw, got {mi.approximate!r}")
    _need(mi.approximate_above is None or mi.approximate_above >= 0,
          f"{s}: [mining] approximate_above must be >= 0")
    ct, mg = config.class_tree, config.magnet
    for name, sec in (("class_tree", ct), ("magnet", mg)):
        _need(sec.refresh_every >= 1, f"{s}: [{name}] refresh_every must be >= 1")
        _need(sec.batch_size >= 1, f"{s}: [{name}] batch_size must be >= 1")
    _need(ct.classes_per_anchor >= 1, f"{s}: [class_tree] classes_per_anchor must be >= 1")
    _need(mg.clusters_per_class >= 1, f"{s}: [magnet] clusters_per_class must be >= 1")
    _need(mg.iterations >= 1, f"{s}: [magnet] iterations must be >= 1")
    kind = structured_loss(config.loss.name)
    _check_distill(config, s, kind is not None and getattr(config, kind).enabled)
    if kind is not None and getattr(config, kind).enabled:
        what = "the class tree" if kind == "class_tree" else "the magnet clusters"
        _need(b.p is not None and b.k is not None,
              f"{s}: [{kind}] {what} builds the batches: set [batch] p and k")
        _need(not mi.global_index,
              f"{s}: [mining] global_index and [{kind}] both build the batches; set "
              f"[mining] global_index = false or [{kind}] enabled = false")
        _need(b.min_images == BatchConfig.min_images,
              f"{s}: [batch] min_images chooses the identities of P×K batches, but with "
              f"[{kind}] the batches come from {what}: remove it (or filter the dataset with "
              "[data] min_images)")
        if kind == "class_tree" and b.p is not None:
            _need(b.p % ct.classes_per_anchor == 0,
                  f"{s}: [class_tree] classes_per_anchor ({ct.classes_per_anchor}) must divide "
                  f"[batch] p ({b.p}): a batch is p / classes_per_anchor anchors, each with "
                  f"classes_per_anchor − 1 neighbours")


def _check_distill(config: TrainConfig, s: str, structured: bool) -> None:
    ds = config.distill
    if not ds.enabled:
        return
    _need(bool(ds.teacher), f"{s}: [distill] teacher must name a model ('dlib', a run, .onnx)")
    _need(ds.workers >= 1 and ds.chunk >= 1, f"{s}: [distill] workers and chunk must be >= 1")
    _need(ds.embedding_kind in ("cosine", "l2"),
          f"{s}: [distill] embedding_kind must be 'cosine' or 'l2', got {ds.embedding_kind!r}")
    weights = {"label": ds.label, "embedding": ds.embedding, "rkd_distance": ds.rkd_distance,
               "rkd_angle": ds.rkd_angle, "similarity": ds.similarity}
    for name, w in weights.items():
        _need(math.isfinite(w) and w >= 0, f"{s}: [distill] {name} must be >= 0, got {w}")
    _need(any(w > 0 for k, w in weights.items() if k != "label"),
          f"{s}: [distill] needs a distillation term: set embedding, rkd_distance, rkd_angle "
          "or similarity above 0")
    _need(not (config.mining.global_index or structured),
          f"{s}: [distill] does not combine with [mining] global_index, [class_tree] or "
          "[magnet] (they re-embed the dataset and build their own batches); turn them off")
    _need(Path(config.data.root).suffix != ".rec",
          f"{s}: [distill] needs an image folder as [data] root (the teacher cache sits "
          "beside the images), not a RecordIO file")


__all__ = [
    "AugmentConfig",
    "AuxLossConfig",
    "BatchConfig",
    "ClassTreeConfig",
    "DataConfig",
    "DistillConfig",
    "LossConfig",
    "MagnetConfig",
    "MiningConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PartialFCConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "check_config",
    "config_from_dict",
    "load_config",
    "structured_loss",
]
