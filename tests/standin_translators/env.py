"""Environment for a gateway subprocess that should see the stand-in translators."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(__file__).resolve().parent / "sitecustomize_dir"


def gateway_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SITE), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}
