"""The recognition API's default model: an exported ONNX file installed once per user.

No model hub can be reached and facemetric ships no weights, so the default model is the one
installed on this machine: ``make demo`` trains the distilled student (dlib's network
fine-tuned on facemetric's crops), exports it to ONNX and installs it;
``facemetric default-model FILE.onnx`` installs any other export. ``load_model("default")``,
``Recognizer()`` without a model and ``facemetric serve`` without ``--model`` use it.

Layout under ``$FACEMETRIC_HOME`` (default ``~/.facemetric``; the field's convention of a
per-user model folder, as ``~/.insightface`` or ``~/.deepface``)::

    models/<fingerprint[:16]>.onnx   installed copies, never overwritten
    models/default.json              which of them is the default (replaced atomically)

A copy is named after its contract's fingerprint and never changed afterwards, and the
pointer is replaced in one rename. So installing a new default never alters a file that a
running service has loaded or will load: :func:`resolve_default_model` turns ``"default"``
into that immutable file once (``facemetric serve`` does it before starting its workers), and
every worker and restart of that service reads the same model even if the default changes
meanwhile. Only ONNX exports are accepted: they carry their contract and threshold table and
run without the training code (docs/recognition.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from facemetric.atomic import atomic_write_bytes

DEFAULT = "default"
"""The model ``source`` naming the installed default model."""

HOME_ENV = "FACEMETRIC_HOME"
"""Environment variable: facemetric's per-user folder (default ``~/.facemetric``)."""

POINTER_FILE = "default.json"

INSTALL_HELP = (
    "`make demo` trains, exports and installs one (the distilled student); "
    "`facemetric default-model MODEL.onnx` installs an export "
    "(`facemetric export RUN --out MODEL.onnx`); or name a model explicitly "
    "(a run folder, a checkpoint, an .onnx file, or 'dlib')"
)


@dataclass(frozen=True)
class InstalledModel:
    """The default model as recorded in ``models/default.json``.

    Attributes:
        path: the installed ONNX copy (immutable, named by the fingerprint).
        fingerprint: its contract's fingerprint (:meth:`ModelContract.fingerprint`).
        description: the contract in one line.
        source: the file it was installed from.
        installed: when, as an ISO 8601 UTC time.
        calibrated: whether the file carries a threshold table.
    """

    path: Path
    fingerprint: str
    description: str
    source: str
    installed: str
    calibrated: bool

    def summary(self) -> str:
        """Lines for a person."""
        table = "with its threshold table" if self.calibrated else (
            "NOT calibrated: FAR thresholds need `facemetric calibrate`")
        return (f"default model {self.path}\n  {self.description}\n  {table}\n"
                f"  installed {self.installed} from {self.source}")


_RECORDED = tuple(f.name for f in dataclasses.fields(InstalledModel) if f.name != "path")
"""The fields ``models/default.json`` holds besides the copy's ``file`` name."""


def facemetric_home() -> Path:
    """``$FACEMETRIC_HOME``, or ``~/.facemetric``."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".facemetric"


def models_dir() -> Path:
    """Where installed models lie: ``facemetric_home() / "models"``."""
    return facemetric_home() / "models"


def installed_default() -> InstalledModel | None:
    """The installed default model, or ``None`` when none is installed.

    Raises:
        ValueError: the pointer file is damaged, or names a copy that is gone (the message
            says to install again).
    """
    pointer = models_dir() / POINTER_FILE
    if not pointer.is_file():
        return None
    try:
        raw = json.loads(pointer.read_text(encoding="utf-8"))
        name = raw["file"]
        if not isinstance(name, str) or Path(name).name != name or not name:
            raise ValueError(f"'file' must be a bare file name, got {name!r}")
        path = models_dir() / name
        model = InstalledModel(path=path, **{f: raw[f] for f in _RECORDED})
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{pointer} is damaged ({type(err).__name__}: {err}); install the default "
            f"model again: {INSTALL_HELP}"
        ) from err
    if not path.is_file():
        raise ValueError(
            f"{pointer} names {path}, which is not an installed model file; install the "
            f"default model again: {INSTALL_HELP}"
        )
    return model


def resolve_default_model() -> Path:
    """The ONNX file ``"default"`` stands for now.

    Raises:
        FileNotFoundError: no default model installed (the message says how to get one).
        ValueError: see :func:`installed_default`.
    """
    model = installed_default()
    if model is None:
        raise FileNotFoundError(
            f"no default model is installed (looked in {models_dir()}, set "
            f"{HOME_ENV} to look elsewhere): {INSTALL_HELP}"
        )
    return model.path


def install_default_model(onnx_file: str | os.PathLike[str]) -> InstalledModel:
    """Make the export ``onnx_file`` the default model (see the module docstring).

    The file is opened as :class:`~facemetric.inference.onnx.OnnxEncoder` first, so only a
    facemetric export whose contract, threshold table and graph pass their checks is
    installed. A copy with the same fingerprint that is already installed is reused only
    when its bytes are the same (a re-calibrated export gets a new name).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ``.onnx`` file, or one :class:`OnnxEncoder` refuses.
    """
    from facemetric.inference.onnx import OnnxEncoder

    src = Path(onnx_file)
    if src.suffix.lower() != ".onnx":
        raise ValueError(
            f"the default model must be an exported .onnx file, got {src}: export a run "
            "first (`facemetric export RUN --out MODEL.onnx`)"
        )
    encoder = OnnxEncoder(src)  # FileNotFoundError / ValueError with their own messages
    data = src.read_bytes()
    fingerprint = encoder.contract.fingerprint()
    target_dir = models_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    name = f"{fingerprint[:16]}.onnx"
    n = 1
    while (target_dir / name).exists() and (target_dir / name).read_bytes() != data:
        n += 1
        name = f"{fingerprint[:16]}-{n}.onnx"
    target = target_dir / name
    if not target.exists():
        atomic_write_bytes(target, data)
    model = InstalledModel(
        path=target, fingerprint=fingerprint, description=encoder.contract.describe(),
        source=str(src.resolve()),
        installed=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        calibrated=encoder.thresholds is not None,
    )
    record = {"file": name, **{f: getattr(model, f) for f in _RECORDED}}
    text = json.dumps(record, indent=2) + "\n"
    atomic_write_bytes(target_dir / POINTER_FILE, text.encode())
    return model


__all__ = [
    "DEFAULT",
    "HOME_ENV",
    "InstalledModel",
    "facemetric_home",
    "install_default_model",
    "installed_default",
    "models_dir",
    "resolve_default_model",
]
