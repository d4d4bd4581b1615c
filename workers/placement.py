"""Which served models go on which GPU, for `laneway workers --gpus`.

A worker loads every model it serves at start-up, so a plan that does not fit would only
show itself as an out-of-memory error minutes later, on one GPU, in one worker's log.
This module decides up front, from the catalog's ``memory_mb`` (weights plus activations
at the default budget) and each GPU's free memory, and refuses with a message that names
what does not fit where.

The policy (``plan``):

1. Every GPU keeps ``headroom_mb`` back (the worker's CUDA context and allocator slack).
2. Each model is placed once, largest ``memory_mb`` first, on the GPU with the most memory
   left that holds it (worst-fit decreasing: it spreads the load instead of filling one
   GPU). A model that fits nowhere makes ``plan`` raise ``PlacementError``; the greedy
   order can miss a packing that exists, which the message's numbers let a person see.
3. Then replicas, for throughput: each model, largest first, is added to every GPU that
   lacks it and still has room. A GPU that can hold all the models ends up with all of
   them, so ``--gpus all`` means one worker per GPU, each serving what fits.
4. A GPU that gets no model gets no worker. ``memory_mb: 0`` means unknown: the model is
   taken to fit, with a warning.

``complete`` then keeps the GPUs that serve *every* model: a capability's workers share
one queue (``<capability>.live``), so a worker that lacks a model would fail the requests
for it that it happens to take.

``inventory`` reads the GPUs from NVML (``pynvml``, from ``nvidia-ml-py``) or, without it,
from torch in a short child process, so the launcher holds no CUDA context on any GPU while
its workers run. Indices are nvidia-smi's (PCI bus order). Nothing here imports torch or
NVML at import time.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from configs.catalog import CatalogEntry

log = logging.getLogger(__name__)

DEFAULT_HEADROOM_MB = 1024
MIB = 1024 * 1024


class PlacementError(ValueError):
    """The models do not fit on the GPUs; the message says which, and what each GPU has."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    free_mb: int
    total_mb: int


@dataclass(frozen=True)
class Plan:
    assignments: dict[int, list[str]]  # gpu index -> model ids (only GPUs that get some)
    left_mb: dict[int, int]  # gpu index -> MB left after headroom and its models


def plan(
    models: Sequence[CatalogEntry], gpus: Sequence[Gpu], *, headroom_mb: int = DEFAULT_HEADROOM_MB
) -> Plan:
    """Place every model at least once, then replicate where room is left (module docstring)."""
    ordered = sorted({m.id: m for m in models}.values(), key=lambda m: (-m.memory_mb, m.id))
    for m in ordered:
        if m.memory_mb <= 0:
            log.warning("model %s has no memory_mb in the catalog: taken to fit", m.id)
    left = {g.index: g.free_mb - headroom_mb for g in gpus}
    placed: dict[int, list[str]] = {g.index: [] for g in gpus}
    missing: list[CatalogEntry] = []
    for m in ordered:
        fits = [i for i in left if left[i] >= m.memory_mb]
        if not fits:
            missing.append(m)
            continue
        best = max(fits, key=lambda i: (left[i], -i))
        placed[best].append(m.id)
        left[best] -= m.memory_mb
    if missing:
        raise PlacementError(_refusal(missing, gpus, placed, left, headroom_mb))
    for m in ordered:
        for i in sorted(left, key=lambda i: (-left[i], i)):
            if m.id not in placed[i] and left[i] >= m.memory_mb:
                placed[i].append(m.id)
                left[i] -= m.memory_mb
    order = [m.id for m in ordered]
    assignments = {i: sorted(ids, key=order.index) for i, ids in placed.items() if ids}
    return Plan(assignments, {i: left[i] for i in assignments})


def _refusal(
    missing: list[CatalogEntry],
    gpus: Sequence[Gpu],
    placed: dict[int, list[str]],
    left: dict[int, int],
    headroom_mb: int,
) -> str:
    lines = [f"these models do not fit on the GPUs (each GPU keeps {headroom_mb} MB headroom):"]
    lines += [f"  {m.id} needs {m.memory_mb} MB" for m in missing]
    lines.append("GPUs:" if gpus else "GPUs: none")
    for g in gpus:
        taken = f", {max(left[g.index], 0)} MB left after {', '.join(placed[g.index])}"
        lines.append(
            f"  GPU {g.index} ({g.name}): {g.free_mb} MB free of {g.total_mb} MB"
            + (taken if placed[g.index] else "")
        )
    lines.append("serve fewer or smaller models (--models), or free memory on the GPUs")
    return "\n".join(lines)


def complete(result: Plan, models: Sequence[CatalogEntry]) -> Plan:
    """The GPUs of ``result`` that serve every model; PlacementError when there is none.

    Workers of a capability share its queue, so each must serve every model."""
    wanted = {m.id for m in models}
    kept = {i: ids for i, ids in result.assignments.items() if set(ids) >= wanted}
    if not kept:
        raise PlacementError(
            "no GPU can hold all of "
            + ", ".join(f"{m.id} ({m.memory_mb} MB)" for m in models)
            + "; the workers of a capability share one queue, so each must serve every "
            "model: serve fewer models (--models) or free memory. The plan was:\n"
            + "\n".join(f"  GPU {i}: {', '.join(ids)}" for i, ids in result.assignments.items())
        )
    return Plan(kept, {i: result.left_mb[i] for i in kept})


def parse_gpus(spec: str) -> list[int] | None:
    """``all`` -> None (every GPU); ``0,2`` -> [0, 2]."""
    if spec.strip() == "all":
        return None
    try:
        indices = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--gpus takes all or a comma list of indices, not {spec!r}") from None
    if not indices or any(i < 0 for i in indices):
        raise SystemExit(f"--gpus takes all or a comma list of indices, not {spec!r}")
    return sorted(set(indices))


def inventory(indices: Sequence[int] | None = None) -> list[Gpu]:
    """The GPUs ``indices`` names (all when None), with their free memory now."""
    found = _nvml_gpus()
    if found is None:
        found = _torch_gpus()
    if not found:
        raise SystemExit(
            "no GPUs found (neither NVML nor torch.cuda sees one); "
            "use `laneway worker --device cpu` instead"
        )
    if indices is None:
        return found
    by_index = {g.index: g for g in found}
    unknown = [i for i in indices if i not in by_index]
    if unknown:
        raise SystemExit(
            f"--gpus names GPU(s) {', '.join(map(str, unknown))}, which this machine lacks; "
            f"it has {', '.join(f'{g.index} ({g.name})' for g in found)}"
        )
    return [by_index[i] for i in indices]


def _nvml_gpus() -> list[Gpu] | None:
    """The GPUs NVML lists; None when NVML is not installed or has no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("NVML is not usable (%s); asking torch", exc)
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            gpus.append(Gpu(i, name, int(memory.free) // MIB, int(memory.total) // MIB))
        return gpus
    finally:
        pynvml.nvmlShutdown()


# run in a child: torch.cuda.mem_get_info makes a CUDA context on each GPU, which would
# stay (hundreds of MB per GPU) for as long as the launcher waits on its workers
_TORCH_PROBE = """
import json, torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append([i, torch.cuda.get_device_name(i), free, total])
print(json.dumps(gpus))
"""


def _torch_gpus() -> list[Gpu]:
    """The GPUs torch sees (in PCI bus order, as nvidia-smi numbers them); [] on failure."""
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(
        [sys.executable, "-c", _TORCH_PROBE], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        log.warning("asking torch for the GPUs failed: %s", done.stderr.strip()[-500:])
        return []
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [Gpu(int(i), str(n), int(f) // MIB, int(t) // MIB) for i, n, f, t in rows]
