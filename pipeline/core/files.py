"""Small file helpers shared by the stages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weights, shards, the Inception file)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | Path, record: Any, sort_keys: bool = False) -> Path:
    """Write `record` as indented JSON with a final newline (the reports, specs and stats that
    DVC tracks and people read); creates the parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=sort_keys) + "\n")
    return path
