"""configs.capabilities: every registry entry names modules that exist and expose what the
generic code calls, and each process imports only its own layer."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from configs.capabilities import CAPABILITIES, REGISTRY
from configs.catalog import COMMON_DEFAULTS, CatalogOptions
from tasks.batches.endpoints import BATCH_ENDPOINTS
from tasks.contracts.base import EngineCounter

# what every contract module declares (tasks/contracts/base.py): generic code (api/limits.py,
# api/metrics.py, configs/catalog.py) reads them through the registry, and a hook left out
# must fail here, not pass as a silent 0 tokens held or a missing metric
HOOKS = ("CAPABILITY", "estimate_tokens", "ENGINE_COUNTERS", "OPTIONS")


@pytest.mark.parametrize("name", CAPABILITIES)
def test_each_entry_names_its_layers(name: str) -> None:
    cap = REGISTRY[name]
    assert cap.name == name
    assert hasattr(cap.api_module(), "router")
    worker = cap.worker_module()
    assert callable(worker.live_handler) and callable(worker.batch_executor)
    contract = cap.contract_module()
    # the contract's own names agree with its registry entry (configs/ cannot import them)
    assert getattr(contract, "CAPABILITY", name) == name
    assert getattr(contract, "ENDPOINT", cap.batch_endpoints[0]) in cap.batch_endpoints
    module, _, cls = cap.default_backend.partition(":")
    assert cls and module.startswith("workers.backends.")
    for endpoint in cap.batch_endpoints:
        assert BATCH_ENDPOINTS[endpoint] == name


@pytest.mark.parametrize("name", CAPABILITIES)
def test_each_contract_declares_every_hook(name: str) -> None:
    contract = REGISTRY[name].contract_module()
    missing = [hook for hook in HOOKS if not hasattr(contract, hook)]
    assert not missing, f"{contract.__name__} declares no {', '.join(missing)}"
    assert list(inspect.signature(contract.estimate_tokens).parameters) == ["payload"]
    assert isinstance(contract.estimate_tokens({}), int)
    counters = contract.ENGINE_COUNTERS
    assert isinstance(counters, tuple)
    for counter in counters:
        assert isinstance(counter, EngineCounter), counter
        assert counter.name.startswith("laneway_") and not counter.name.endswith("_total")
        assert counter.key and counter.help
    options = contract.OPTIONS
    assert isinstance(options, type) and issubclass(options, CatalogOptions)
    assert options.model_config.get("extra") == "forbid" and options.model_config.get("frozen")
    assert not set(COMMON_DEFAULTS) & set(options.model_fields)  # CatalogEntry's own
    assert isinstance(options().public(), dict)  # every option has a default


def test_the_api_imports_no_worker_code_no_torch_and_not_the_cli() -> None:
    code = (
        "import sys; import api.app; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] in "
        "('workers', 'laneway'));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
