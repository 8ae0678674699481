"""Export a backbone to ONNX with its contract and thresholds; run it with onnxruntime.

The file :func:`export_onnx` writes is self-describing: one graph and, in the model's
``metadata_props``, everything needed to use it correctly.

Graph:
    input ``"faces"``: ``(N, 3, S, S)`` float32, the *normalised* network input
    (``(x / 255 − mean) / std`` per channel, ``S = input_size``: exactly what
    :func:`~facemetric.inference.encoder.input_tensor` makes), ``N`` a dynamic axis;
    output ``"embeddings"``: ``(N, D)`` float32 *raw* embeddings (not normalised). Resizing,
    normalisation, the flip test and the final L2 normalisation stay outside the graph, in
    :class:`~facemetric.inference.encoder.Encoder`, so the torch and ONNX encoders share
    one implementation of them.

Metadata (string key → string value):
    ``facemetric.format_version``: ``"1"``;
    ``facemetric.contract``: the :class:`~facemetric.inference.contract.ModelContract` as
    JSON, ``source="onnx"`` — its fingerprint equals the torch encoder's, since the same
    weights make the same embeddings;
    ``facemetric.thresholds``: the :class:`~facemetric.inference.calibration.ThresholdTable`
    as JSON (absent when the model was never calibrated).

:class:`OnnxEncoder` refuses a file without this metadata (a foreign ONNX model does not
say how its input must be aligned and normalised), a contract whose stored fingerprint
does not match its fields, a threshold table calibrated for another model and a graph
whose input/output shapes disagree with the contract. ONNX files are protobuf: loading one
never runs pickled code.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch

from facemetric.atomic import atomic_write_bytes
from facemetric.inference.calibration import ThresholdTable
from facemetric.inference.contract import ModelContract
from facemetric.inference.encoder import Encoder, TorchEncoder, input_tensor

logger = logging.getLogger(__name__)

INPUT_NAME = "faces"
OUTPUT_NAME = "embeddings"
FORMAT_KEY = "facemetric.format_version"
CONTRACT_KEY = "facemetric.contract"
THRESHOLDS_KEY = "facemetric.thresholds"
FORMAT_VERSION = "1"
DEFAULT_OPSET = 17
"""Opset of exported graphs (ONNX Runtime ≥ 1.14 runs it); at least 17 is required."""

_INSTALL_HINT = "install the ONNX extra: pip install 'facemetric[onnx]'"
_TRACE_BATCH = 2
_VERIFY_BATCH = 3  # differs from the traced batch, so a batch size baked into the graph fails
_VERIFY_RTOL = 1e-3

Exporter = Literal["auto", "torchscript", "dynamo"]


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"{name} is needed for ONNX models; {_INSTALL_HINT}") from err


def _has_dynamo_switch() -> bool:
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


def _export_torchscript(model: torch.nn.Module, dummy: torch.Tensor, opset: int) -> bytes:
    """The TorchScript (tracing) exporter; ``dynamic_axes`` makes the batch symbolic."""
    import io

    buffer = io.BytesIO()
    kwargs: dict[str, Any] = {"dynamo": False} if _has_dynamo_switch() else {}
    with warnings.catch_warnings():
        # the exporter's own deprecation notice, and the backbones' input-shape checks,
        # which the tracer sees as constant branches (true for every valid input)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings(
            "ignore", category=torch.jit.TracerWarning, module=r"facemetric\.models\.registry"
        )
        torch.onnx.export(
            model,
            (dummy,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            **kwargs,
        )
    return buffer.getvalue()


def _export_dynamo(model: torch.nn.Module, dummy: torch.Tensor, opset: int) -> bytes:
    """The ``torch.export``-based exporter (onnxscript); the batch is a ``Dim``. Its
    operators start at opset 18, so a lower ``opset`` is raised to 18 (no down-conversion)."""
    if not _has_dynamo_switch():
        raise RuntimeError(f"torch {torch.__version__} has no torch.export-based ONNX exporter")
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (dummy,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=max(opset, 18),
        dynamo=True,
        verbose=False,
    )
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise RuntimeError("the dynamo ONNX exporter returned no program")
    return program.model_proto.SerializeToString()


def _run_session(session: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], dtype=np.float32)


def _session(source: str | bytes, threads: int | None) -> Any:
    ort = _import("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no optimiser chatter
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def export_onnx(
    encoder: TorchEncoder,
    out: str | os.PathLike[str],
    thresholds: ThresholdTable | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "auto",
    verify: bool = True,
) -> Path:
    """Write ``encoder``'s backbone, contract and thresholds to the ONNX file ``out``.

    The graph and metadata are described in the module docstring. The file is written
    atomically (a crash leaves the old file or the complete new one).

    Args:
        encoder: a :class:`TorchEncoder` (its model is copied to the CPU; the encoder is
            not changed).
        out: the ``.onnx`` file to write.
        thresholds: the threshold table to store; ``None`` stores the encoder's own
            (``encoder.thresholds``, e.g. a run's ``calibration.json``) when it has one.
        opset: ONNX opset, at least 17 (the dynamo exporter uses at least 18); the opset
            written is recorded in the contract's ``extra["opset"]``.
        exporter: ``"torchscript"`` (torch's tracing exporter), ``"dynamo"``
            (``torch.export`` + onnxscript) or ``"auto"``: TorchScript, falling back to
            dynamo when it fails or this torch no longer has it.
        verify: run the exported graph with onnxruntime on a batch of 3 random inputs
            (a batch size other than the traced one) and refuse the export unless
            ``max|onnx − torch| ≤ 1e-3 · max|torch|``.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: a table calibrated for another model, ``opset < 17``, an unknown
            exporter, or an export that onnxruntime does not reproduce.
        RuntimeError: the export failed (the message gives each exporter's error).
        ImportError: ``onnx``/``onnxruntime`` missing.
    """
    if not isinstance(encoder, TorchEncoder):
        raise ValueError(
            f"export_onnx needs a TorchEncoder (a backbone in memory), got "
            f"{type(encoder).__name__}: load the training checkpoint with load_model first"
        )
    if opset < 17:
        raise ValueError(f"opset must be at least 17, got {opset}")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}")
    onnx = _import("onnx")
    contract = encoder.contract
    table = encoder.thresholds if thresholds is None else thresholds
    if table is not None:
        table.check_model(contract.fingerprint(), "the threshold table to export")

    model = copy.deepcopy(encoder.model).cpu().to(memory_format=torch.contiguous_format).eval()
    size = contract.input_size
    gen = torch.Generator().manual_seed(0)
    dummy = torch.randn(_TRACE_BATCH, 3, size, size, generator=gen)

    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    data: bytes | None = None
    used = ""
    for name in order:
        try:
            if name == "torchscript":
                data = _export_torchscript(model, dummy, opset)
            else:
                data = _export_dynamo(model, dummy, opset)
            used = name
            break
        except Exception as err:  # an exporter can fail in many ways; try the next one
            if exporter != "auto":
                raise RuntimeError(f"ONNX export ({name}) failed: {err}") from err
            logger.warning("ONNX export with the %s exporter failed (%s)", name, err)
            errors.append(f"{name}: {type(err).__name__}: {err}")
    if data is None:
        raise RuntimeError("ONNX export failed with every exporter:\n" + "\n".join(errors))

    proto = onnx.load_from_string(data)
    actual_opset = max(
        (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset
    )
    exported = dataclasses.replace(
        contract,
        source="onnx",
        extra={
            **contract.extra,
            "exported_from": contract.source,
            "exporter": used,
            "opset": int(actual_opset),
            "torch": torch.__version__,
        },
    )
    meta = {FORMAT_KEY: FORMAT_VERSION, CONTRACT_KEY: exported.to_json()}
    if table is not None:
        meta[THRESHOLDS_KEY] = table.to_json()
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"facemetric face encoder: {exported.describe()}"
    onnx.checker.check_model(proto)
    payload = proto.SerializeToString()

    if verify:
        with torch.inference_mode():
            check = torch.randn(_VERIFY_BATCH, 3, size, size, generator=gen)
            expected = model(check).float().numpy()
        got = _run_session(_session(payload, None), check.numpy())
        scale = max(float(np.abs(expected).max()), 1e-30)
        err = float(np.abs(got - expected).max()) if got.shape == expected.shape else np.inf
        if not err <= _VERIFY_RTOL * scale:
            raise ValueError(
                f"onnxruntime does not reproduce the torch backbone (max abs difference "
                f"{err:.3g} on outputs up to {scale:.3g}, shapes {got.shape} vs "
                f"{expected.shape}): try exporter='dynamo' or 'torchscript', or another opset"
            )
    return atomic_write_bytes(out, payload)


def _check_io(session: Any, contract: ModelContract, path: Path) -> None:
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    s, d = contract.input_size, contract.embedding_size
    in_shape = inputs.get(INPUT_NAME)
    out_shape = outputs.get(OUTPUT_NAME)
    if (
        in_shape is None
        or out_shape is None
        or len(in_shape) != 4
        or list(in_shape[1:]) != [3, s, s]
        or len(out_shape) != 2
        or out_shape[1] != d
    ):
        raise ValueError(
            f"{path}: the graph's inputs {inputs} / outputs {outputs} do not match its "
            f"contract ({INPUT_NAME!r}: (N, 3, {s}, {s}), {OUTPUT_NAME!r}: (N, {d})): the "
            "file was edited after export; export it again"
        )


class OnnxEncoder(Encoder):
    """A backbone exported by :func:`export_onnx`, run with onnxruntime on the CPU.

    Args:
        path: the ``.onnx`` file.
        flip_test: ``None`` keeps the stored contract's setting; a bool overrides it (the
            fingerprint changes with it, and a threshold table calibrated for the other
            setting is then dropped: ``thresholds`` becomes ``None``).
        threads: onnxruntime's ``intra_op_num_threads`` (``None``: its default, one per
            physical core).

    Attributes:
        contract: the stored contract (``source="onnx"``; ``extra["onnx_file"]`` the path).
        thresholds: the stored threshold table, or ``None``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable ONNX file, no facemetric metadata, a contract or table
            that fails its checks, or a graph that disagrees with its contract (module
            docstring).
        ImportError: onnxruntime missing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        flip_test: bool | None = None,
        *,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file {self.path}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be positive or None, got {threads}")
        try:
            self.session = _session(str(self.path), threads)
        except ImportError:
            raise
        except Exception as err:  # onnxruntime raises its own types for bad files
            raise ValueError(
                f"{self.path} is not a readable ONNX model ({type(err).__name__}: {err}); "
                "export a trained model with facemetric.inference.onnx.export_onnx"
            ) from err
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        stored, table = read_metadata(meta, self.path)
        _check_io(self.session, stored, self.path)
        contract = dataclasses.replace(
            stored, extra={**stored.extra, "onnx_file": str(self.path)}
        )
        if flip_test is not None and flip_test != stored.flip_test:
            contract = dataclasses.replace(contract, flip_test=flip_test)
            if table is not None:
                logger.info(
                    "%s: its threshold table was calibrated with flip test %s; flip test is "
                    "now %s, so the table is not used",
                    self.path, "on" if stored.flip_test else "off", "on" if flip_test else "off",
                )
                table = None
        self.contract = contract
        self.thresholds = table

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        return _run_session(self.session, input_tensor(faces, self.contract))


def write_thresholds(path: str | os.PathLike[str], table: ThresholdTable) -> Path:
    """Store ``table`` in the metadata of the exported file ``path`` (replacing any table it
    had), atomically. The graph is not touched.

    Raises:
        ValueError: not a facemetric export, or a table calibrated for another model.
    """
    onnx = _import("onnx")
    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except Exception as err:
        raise ValueError(f"{path} is not a readable ONNX file: {err}") from err
    meta = {p.key: p.value for p in proto.metadata_props}
    contract, _ = read_metadata(meta, path)
    table.check_model(contract.fingerprint(), "the threshold table")
    meta[THRESHOLDS_KEY] = table.to_json()
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return atomic_write_bytes(path, proto.SerializeToString())


def read_metadata(
    meta: Mapping[str, str], where: str | os.PathLike[str] = "the ONNX file"
) -> tuple[ModelContract, ThresholdTable | None]:
    """``(contract, threshold table or None)`` from an exported file's metadata map.

    Raises:
        ValueError: no facemetric contract, an unknown format version, a contract or table
            that does not parse, or a table calibrated for another model.
    """
    if CONTRACT_KEY not in meta:
        raise ValueError(
            f"{where} has no facemetric model contract in its metadata (key {CONTRACT_KEY!r}): "
            "it was not written by facemetric's export_onnx, so how its input must be "
            "aligned and normalised is unknown; export the model with "
            "facemetric.inference.onnx.export_onnx"
        )
    version = meta.get(FORMAT_KEY, FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: facemetric ONNX format {version!r}, this version reads "
            f"{FORMAT_VERSION!r}: upgrade facemetric"
        )
    try:
        contract = ModelContract.from_json(meta[CONTRACT_KEY])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    table = None
    if THRESHOLDS_KEY in meta:
        try:
            table = ThresholdTable.from_json(meta[THRESHOLDS_KEY])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        table.check_model(contract.fingerprint(), f"the threshold table stored in {where}")
    return contract, table


__all__ = [
    "CONTRACT_KEY",
    "DEFAULT_OPSET",
    "FORMAT_KEY",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "THRESHOLDS_KEY",
    "OnnxEncoder",
    "export_onnx",
    "read_metadata",
    "write_thresholds",
]
