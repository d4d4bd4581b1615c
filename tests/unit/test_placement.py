"""workers.placement and `laneway workers`: models on GPUs by memory_mb, on fake inventories,
and the worker processes it would start (Popen recorded, nothing spawned)."""

from __future__ import annotations

import logging
import sys

import pytest

from configs.catalog import Catalog, CatalogEntry
from configs.settings import Settings
from laneway.cli import build_parser, cmd_workers
from workers import launcher, placement
from workers.placement import Gpu, PlacementError, complete, parse_gpus, plan


def model(model_id: str, memory_mb: int, capability: str = "audio") -> CatalogEntry:
    return CatalogEntry(
        id=model_id,
        capability=capability,
        backend="workers.backends.fake:Fake",
        source={"hub": model_id},
        max_input_tokens=512,
        batch_token_budget=1024,
        memory_mb=memory_mb,
    )


def gpu(index: int, free_mb: int, total_mb: int = 80_000) -> Gpu:
    return Gpu(index=index, name=f"Fake H{index}", free_mb=free_mb, total_mb=total_mb)


BIG, MID, SMALL = model("big", 30_000), model("mid", 10_000), model("small", 1_000)


def test_everything_fits_on_one_gpu() -> None:
    result = plan([SMALL, BIG, MID], [gpu(0, 80_000)], headroom_mb=1_000)
    assert result.assignments == {0: ["big", "mid", "small"]}  # largest first
    assert result.left_mb == {0: 80_000 - 1_000 - 41_000}


def test_two_gpus_get_a_replica_of_everything_that_fits() -> None:
    result = plan([BIG, MID, SMALL], [gpu(0, 50_000), gpu(1, 60_000)], headroom_mb=0)
    assert result.assignments == {0: ["big", "mid", "small"], 1: ["big", "mid", "small"]}


def test_a_model_too_big_for_any_gpu_is_refused_with_the_numbers() -> None:
    huge = model("huge", 90_000)
    with pytest.raises(PlacementError) as caught:
        plan([huge, SMALL], [gpu(0, 40_000), gpu(1, 24_000, total_mb=24_576)], headroom_mb=512)
    message = str(caught.value)
    assert "huge needs 90000 MB" in message
    assert "GPU 0 (Fake H0): 40000 MB free of 80000 MB" in message
    assert "GPU 1 (Fake H1): 24000 MB free of 24576 MB" in message
    assert "512 MB headroom" in message
    assert "small needs" not in message  # only what does not fit


def test_models_too_big_together_are_spread_and_only_complete_gpus_get_workers() -> None:
    gpus = [gpu(0, 32_000), gpu(1, 12_000)]
    result = plan([BIG, MID], gpus, headroom_mb=1_000)
    assert result.assignments == {0: ["big"], 1: ["mid"]}
    # a capability's workers share one queue: none of these GPUs can serve both models
    with pytest.raises(PlacementError, match="no GPU can hold all of big"):
        complete(result, [BIG, MID])


def test_a_gpu_that_cannot_hold_every_model_gets_no_worker() -> None:
    result = plan([BIG, SMALL], [gpu(0, 40_000), gpu(1, 8_000)], headroom_mb=1_000)
    assert result.assignments == {0: ["big", "small"], 1: ["small"]}
    assert complete(result, [BIG, SMALL]).assignments == {0: ["big", "small"]}


def test_a_gpu_with_no_room_gets_no_worker() -> None:
    result = plan([BIG], [gpu(0, 40_000), gpu(1, 2_000)], headroom_mb=1_000)
    assert result.assignments == {0: ["big"]}


def test_unknown_memory_is_taken_to_fit_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="workers.placement"):
        result = plan([model("mystery", 0)], [gpu(0, 2_000)], headroom_mb=1_000)
    assert result.assignments == {0: ["mystery"]}
    assert "mystery has no memory_mb" in caplog.text


@pytest.mark.parametrize(
    ("spec", "want"), [("all", None), ("0,2", [0, 2]), ("2,0,2", [0, 2]), ("1", [1])]
)
def test_gpus_spec(spec: str, want: list[int] | None) -> None:
    assert parse_gpus(spec) == want


@pytest.mark.parametrize("bad", ["", "zero", "0,x", "-1"])
def test_gpus_spec_refuses_nonsense(bad: str) -> None:
    with pytest.raises(SystemExit, match="--gpus takes"):
        parse_gpus(bad)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> list[Gpu]:
    """Three fake GPUs seen through NVML; torch must not be asked."""
    gpus = [gpu(0, 40_000), gpu(1, 20_000), gpu(2, 40_000)]
    monkeypatch.setattr(placement, "_nvml_gpus", lambda: list(gpus))
    monkeypatch.setattr(placement, "_torch_gpus", lambda: pytest.fail("torch was asked"))
    return gpus


def test_inventory_picks_the_named_indices(machine: list[Gpu]) -> None:
    assert [g.index for g in placement.inventory([0, 2])] == [0, 2]
    assert placement.inventory(None) == machine


def test_inventory_refuses_an_index_the_machine_lacks(machine: list[Gpu]) -> None:
    with pytest.raises(SystemExit, match=r"GPU\(s\) 5, which this machine lacks"):
        placement.inventory([0, 5])


def test_inventory_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "_nvml_gpus", lambda: None)
    monkeypatch.setattr(placement, "_torch_gpus", lambda: [gpu(0, 1_000)])
    assert placement.inventory(None) == [gpu(0, 1_000)]


def test_no_gpus_is_a_clear_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "_nvml_gpus", lambda: None)
    monkeypatch.setattr(placement, "_torch_gpus", lambda: [])
    with pytest.raises(SystemExit, match=r"no GPUs found.*--device cpu"):
        placement.inventory(None)


class Recorded:
    """Stands in for subprocess.Popen: keeps argv and env, exits 0 at once."""

    started: list[Recorded]

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        Recorded.started.append(self)

    def wait(self) -> int:
        return 0


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch, machine: list[Gpu]) -> list[Recorded]:
    catalog = Catalog(
        {m.id: m for m in [BIG, MID, SMALL, model("embed", 500, capability="embeddings")]}
    )
    monkeypatch.setattr(launcher, "load_catalog", lambda _path: catalog)
    monkeypatch.setattr(launcher.subprocess, "Popen", Recorded)
    Recorded.started = []
    return Recorded.started


def run(monkeypatch: pytest.MonkeyPatch, argv: list[str], served: list[str] | None = None) -> int:
    """`laneway workers ARGV` with LANEWAY_MODELS=served."""
    settings = Settings(models=served or ["small", "embed"])
    monkeypatch.setattr(launcher, "get_settings", lambda: settings)
    return cmd_workers(build_parser().parse_args(["workers", *argv]))


def test_one_worker_per_gpu_each_seeing_only_its_gpu(
    monkeypatch: pytest.MonkeyPatch, started: list[Recorded], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run(monkeypatch, ["--capability", "audio", "--gpus", "0,2", "--models", "mid,small"]) == 0
    )
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in started] == ["0", "2"]
    for w, index in zip(started, [0, 2], strict=True):
        assert w.argv[0] == sys.executable
        assert w.argv[w.argv.index("--models") + 1] == "mid,small"
        assert w.argv[w.argv.index("--device") + 1] == "cuda:0"  # the one GPU it sees
        assert w.argv[w.argv.index("--capability") + 1] == "audio"
        assert f"laneway_worker=audio-gpu{index}" in w.argv  # what ps shows
        assert w.env["LANEWAY_WORKER_NAME"] == f"audio-gpu{index}"
        assert w.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    out = capsys.readouterr().out
    assert "GPU 0 (Fake H0, 40000 MB free): mid, small" in out
    assert "GPU 2 (Fake H2, 40000 MB free): mid, small" in out


def test_models_default_to_laneway_models_of_the_capability(
    monkeypatch: pytest.MonkeyPatch, started: list[Recorded]
) -> None:
    run(monkeypatch, ["--capability", "embeddings"], served=["small", "embed"])
    assert [w.argv[w.argv.index("--models") + 1] for w in started] == ["embed"] * 3


def test_a_gpu_too_small_for_every_model_gets_no_worker(
    monkeypatch: pytest.MonkeyPatch, started: list[Recorded], capsys: pytest.CaptureFixture[str]
) -> None:
    run(monkeypatch, ["--capability", "audio", "--models", "big,small"])
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in started] == ["0", "2"]
    assert "GPU 1 (Fake H1, 20000 MB free): no worker" in capsys.readouterr().out


def test_what_does_not_fit_is_refused_before_any_worker_starts(
    monkeypatch: pytest.MonkeyPatch, started: list[Recorded]
) -> None:
    with pytest.raises(SystemExit, match="big needs 30000 MB") as caught:
        run(monkeypatch, ["--capability", "audio", "--gpus", "1", "--models", "big"])
    assert "GPU 1 (Fake H1): 20000 MB free" in str(caught.value)
    assert started == []


def test_models_of_another_capability_are_refused(
    monkeypatch: pytest.MonkeyPatch, started: list[Recorded]
) -> None:
    with pytest.raises(SystemExit, match=r"embed \(embeddings\)"):
        run(monkeypatch, ["--capability", "audio", "--models", "small,embed"])
    assert started == []


def test_the_workers_subcommand_parses_models_and_headroom() -> None:
    args = build_parser().parse_args(["workers", "--models", "a,b", "--headroom-mb", "2048"])
    assert (args.models, args.headroom_mb, args.gpus) == ("a,b", 2048, "all")
