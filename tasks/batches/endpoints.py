"""Which endpoints a batch may name, and the capability that serves each: from the
capability registry (``configs/capabilities.py``), whose contract modules are imported
here so that what they register (error hints) is in place wherever batches are handled."""

from __future__ import annotations

from configs.capabilities import REGISTRY

BATCH_ENDPOINTS: dict[str, str] = {
    endpoint: cap.name for cap in REGISTRY.values() for endpoint in cap.batch_endpoints
}
for _cap in REGISTRY.values():
    _cap.contract_module()
