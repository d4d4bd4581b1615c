"""Headless Chromium for the page tests: render a URL as a person's browser would, with
no network beyond loopback, and return the DOM after its scripts ran.

Debian's ``chromium`` package (``apt-get install chromium``; .ci/run installs it). Without
it ``require_chromium()`` skips the test, naming what is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# every host name resolves to nothing except the loopback address: a page that needs the
# internet (a CDN script, a web font) fails to load it, as on an air-gapped cluster
LOOPBACK_ONLY = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def require_chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(
            "headless Chromium is not installed (apt-get install chromium; .ci/run does it)"
        )
    return path


def _argv(binary: str, profile: str, budget_ms: int) -> list[str]:
    return [
        binary,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--metrics-recording-only",
        "--no-proxy-server",
        f"--host-resolver-rules={LOOPBACK_ONLY}",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        "--window-size=1280,2000",
    ]


def render(
    url: str,
    *,
    screenshot: Path | None = None,
    budget_ms: int = 15000,
    timeout: float = 90.0,
) -> str:
    """The DOM of ``url`` once its scripts ran (``budget_ms`` of the page's virtual time);
    with ``screenshot``, also a PNG of the page there."""
    binary = require_chromium()
    with tempfile.TemporaryDirectory(prefix="laneway-chromium-") as profile:
        argv = _argv(binary, profile, budget_ms)
        if screenshot is not None:
            shot = subprocess.run(
                [*argv, f"--screenshot={screenshot}", url],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            assert screenshot.exists(), f"no screenshot of {url}: {shot.stderr[-2000:]}"
        dom = subprocess.run(
            [*argv, "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    assert dom.returncode == 0, f"chromium exited with {dom.returncode}: {dom.stderr[-2000:]}"
    return dom.stdout
