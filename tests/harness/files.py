"""Small file-system helpers for the tests."""

from __future__ import annotations

import os


def tree(path: str) -> dict[str, bytes]:
    """Every file under ``path``: relative path -> content."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out
