"""The user cache: probe features, optimised ONNX graphs for read-only bundles."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LENSFORGE_CACHE, else $XDG_CACHE_HOME/lensforge, else ~/.cache/lensforge (not created here)."""
    root = os.environ.get("LENSFORGE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lensforge"
