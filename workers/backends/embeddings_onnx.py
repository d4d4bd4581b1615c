"""Embeddings on ONNX Runtime: the transformers model exported once, then served by ORT.

At the first load the model (``AutoModel``, its ``last_hidden_state``, batch and sequence
axes dynamic) is exported with torch's TorchScript ONNX exporter and cached beside its
weights (``<model dir>/onnx/model.onnx``, where optimum and infinity-emb look too); when
that directory cannot be written, under ``$XDG_CACHE_HOME/laneway/onnx/<key>`` (default
``~/.cache``). Later loads reuse the export unless a weights file is newer than it. With
``quantize: int8`` in the entry's ``defaults`` the export is quantised (dynamic int8
weights, ``onnxruntime.quantization.quantize_dynamic``) into ``model.int8.onnx`` beside it.

Every file is written into a private temporary directory and renamed into place, the
model file last, under an advisory lock: two workers loading the same model at once
export it once and never see a half-written file.

Tokenizing, token inputs and the pooling mode are the transformers backend's; pooling
and normalising run in numpy on ORT's output, as the torch backend does them in torch.
ORT runs with as many intra-op threads as torch would use (``torch.get_num_threads()``:
the cores, or OMP_NUM_THREADS), one forward at a time (the engine's scheduler thread is
its only caller), idle threads asleep rather than spinning; on ``cuda:N`` it takes
CUDAExecutionProvider on device N when this onnxruntime has it (onnxruntime-gpu).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel

from tasks.contracts.embeddings import EmbeddingsOptions
from workers.backends.embeddings import TransformersEmbeddingBackend

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPSET = 17  # LayerNormalization as one op
# what decides whether an export is stale: a newer one of these in the model directory
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "config.json")


def cache_root() -> Path:
    """Where exports go when the model directory is not writable."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "laneway" / "onnx"


def _weights_mtime(model_dir: Path) -> float | None:
    """The newest weights or config file of a local model directory; None for a hub id."""
    if not model_dir.is_dir():
        return None
    times = [f.stat().st_mtime for pat in WEIGHT_PATTERNS for f in model_dir.glob(pat)]
    return max(times, default=None)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An advisory lock on ``directory`` (a ``.lock`` file in it), held by one process."""
    with open(directory / ".lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(tmp: Path, target: Path) -> None:
    """Move every file ``tmp`` holds into ``target``'s directory, ``target`` itself last:
    its presence means the rest (external weight files, if any) is complete."""
    files = [f for f in tmp.iterdir() if f.is_file()]
    for f in sorted(files, key=lambda f: f.name == target.name):
        os.replace(f, target.parent / f.name)


class _Hidden(torch.nn.Module):
    """The model with tensor inputs and its last hidden state as the one output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(model_path: str, out: Path) -> None:
    """Export the model at ``model_path`` to ``out`` in float32 (eager attention: the traced
    graph has no branch on the mask's contents), batch and sequence dynamic."""
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    # a padded row in the example, so the graph applies the attention mask
    ids = torch.full((2, 8), 1, dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 5:] = 0
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks
        torch.onnx.export(
            _Hidden(model),
            (ids, mask),
            str(out),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    del model
    gc.collect()


def quantize_int8(source: Path, out: Path) -> None:
    """Dynamic int8 quantisation of ``source``: int8 weights (one scale per output channel)
    for the matrix products with a constant weight, activations quantised per forward.

    Down-projections (a weight of shape (k, n) with k > n: the feed-forward's second
    product, fed by the activation function's outliers) stay float: on all-MiniLM-L6-v2
    that raises the worst cosine to float over 1,000 sentences from 0.972 to 0.986 for
    about 1.7x float's speed instead of 2.8x; attention's own products (no constant
    weight) stay float too."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    down = [
        node.name
        for node in graph.node
        if node.op_type == "MatMul"
        and len(node.input) == 2
        and len(weight := shapes.get(node.input[1], ())) == 2
        and weight[0] > weight[1]
    ]
    # a model above protobuf's 2 GB keeps its weights in files beside it: so does its int8 one
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    quantize_dynamic(
        source,
        out,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=down,
        use_external_data_format=external,
        extra_options={"MatMulConstBOnly": True},
    )


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """The torch backend's pooling and L2 normalisation, in numpy: float32 (batch, dim)."""
    hidden = hidden.astype(np.float32, copy=False)
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "last":
        pooled = hidden[np.arange(hidden.shape[0]), mask.sum(axis=1) - 1]
    else:
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    if normalize:  # as torch.nn.functional.normalize: the norm clamped at 1e-12
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = pooled / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(pooled, dtype=np.float32)


class OnnxEmbeddingBackend(TransformersEmbeddingBackend):
    """The transformers backend's tokenizer and pooling, with the forward on ONNX Runtime."""

    session: Any

    def load(self) -> None:
        options = EmbeddingsOptions.of(self.entry)  # checked when the catalog loaded
        import onnxruntime as ort

        self._load_text_side(AutoConfig.from_pretrained(self.model_path))
        model_file = self.artefact(MODEL_FILE, lambda out: export_onnx(self.model_path, out))
        if options.quantize == "int8":
            model_file = self.artefact(INT8_FILE, lambda out: quantize_int8(model_file, out))
        if self.entry.dtype != "float32":
            log.info("%s: the ONNX export runs float32, not %s", self.entry.id, self.entry.dtype)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = torch.get_num_threads() or os.cpu_count() or 1
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # idle pool threads sleep instead of spinning: the worker shares the CPUs with the
        # engine's own threads (and, under `laneway up`, the API and Redis). Measured on 2
        # busy cores, 64 clients: 300 requests/s without spinning, 185-220 with it; the
        # forward alone, in a process of its own, loses ~7%
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_file), session_options, providers=self._providers(ort)
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "last_hidden_state" if "last_hidden_state" in outputs else outputs[0]
        log.info(
            "loaded %s on %s (ONNX %s, %s, %d threads, pooling=%s)",
            self.entry.id,
            self.device,
            model_file,
            self.session.get_providers()[0],
            session_options.intra_op_num_threads,
            self.pooling,
        )

    def _providers(self, ort: Any) -> list[Any]:
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                index = int(self.device.partition(":")[2] or 0)
                return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            log.warning(
                "%s: device %s, but this onnxruntime has no CUDAExecutionProvider (install "
                "onnxruntime-gpu); running on the CPU",
                self.entry.id,
                self.device,
            )
        return ["CPUExecutionProvider"]

    # -- the export cache ---------------------------------------------------------------

    def cache_dirs(self) -> list[Path]:
        """Where the ONNX files may be, in order: beside the weights, then the user's cache
        (keyed by the model's resolved path, or its hub id)."""
        root = Path(self.model_path)
        dirs = [root / "onnx"] if root.is_dir() else []
        key = str(root.resolve()) if root.is_dir() else self.model_path
        return [*dirs, cache_root() / hashlib.sha256(key.encode()).hexdigest()[:16]]

    def artefact(self, name: str, make: Callable[[Path], None]) -> Path:
        """``name`` from the first cache directory that has it up to date, else made by
        ``make(path)`` into the first one that can be written."""
        newest = _weights_mtime(Path(self.model_path))

        def fresh(path: Path) -> bool:
            return path.is_file() and (newest is None or path.stat().st_mtime >= newest)

        dirs = self.cache_dirs()
        for directory in dirs:
            if fresh(directory / name):
                log.info("%s: reusing %s", self.entry.id, directory / name)
                return directory / name
        failures = []
        for directory in dirs:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                with _locked(directory):
                    target = directory / name
                    if fresh(target):  # another process made it while we waited
                        return target
                    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=directory) as tmp:
                        t0 = time.perf_counter()
                        make(Path(tmp) / name)
                        _publish(Path(tmp), target)
                    log.info(
                        "%s: wrote %s in %.1f s", self.entry.id, target, time.perf_counter() - t0
                    )
                    return target
            except OSError as exc:
                failures.append(f"{directory}: {exc}")
                log.info("%s: cannot write %s in %s (%s)", self.entry.id, name, directory, exc)
        raise RuntimeError(
            f"model {self.entry.id!r}: no writable directory for its ONNX export ("
            + "; ".join(failures)
            + ")"
        )

    # -- inference ----------------------------------------------------------------------

    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        longest = max(len(seq) for seq in batch)
        ids = np.full((len(batch), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:  # an export made by another tool
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run([self.output], feed)[0]
        return pool(hidden, mask, self.pooling, self.normalize)


__all__ = [
    "OnnxEmbeddingBackend",
    "cache_root",
    "export_onnx",
    "pool",
]
