"""configs.capabilities: every registry entry names modules that exist and expose what the
generic code calls, and each process imports only its own layer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from configs.capabilities import CAPABILITIES, REGISTRY
from tasks.batches.endpoints import BATCH_ENDPOINTS


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


def test_the_api_imports_no_worker_code_no_torch_and_not_the_cli() -> None:
    code = (
        "import sys; import api.app; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] in "
        "('workers', 'laneway'));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
