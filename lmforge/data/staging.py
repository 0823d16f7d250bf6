"""Local copies of remote directories: what DeepSpeed, safetensors and matplotlib need to work on.

Outputs, checkpoints and models live at a ``file://`` or ``s3://`` URI. Code that writes files
works in a local directory and then publishes it; code that reads a model or checkpoint fetches it
once. For ``file://`` the local directory *is* the destination and both steps are no-ops.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lmforge.data.safe_paths import path_under
from lmforge.data.storage import Storage, cache_dir, join_uri, local_path


def local_dir(uri: str, kind: str) -> Path:
    """The directory standing for ``uri``: its own path for file://, a per-URI cache for s3://."""
    if uri.startswith("file://"):
        path = local_path(uri)
    else:
        path = cache_dir(kind) / hashlib.sha256(uri.encode()).hexdigest()[:12]
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(storage: Storage, uri: str, kind: str, target: Path | None = None) -> Path:
    """Every object under ``uri`` copied to ``target`` (default :func:`local_dir`); same-size files kept.

    Keys that would land outside ``target`` (absolute, ``..``, ``//``) are refused before anything is
    written: :class:`lmforge.data.safe_paths.UnsafeName`.
    """
    if uri.startswith("file://"):
        return local_dir(uri, kind)
    target = target or local_dir(uri, kind)
    prefix = uri.rstrip("/") + "/"
    what = f"object key under {prefix}"
    items = [(item, path_under(target, item[len(prefix) :], what=what)) for item in storage.list(uri)]
    for item, path in items:
        if path.exists() and path.stat().st_size == storage.size(item):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.download_file(item, path)
    return target


def publish(storage: Storage, root: Path, uri: str, names: list[str]) -> None:
    """Upload the named files or directories under ``root`` to ``uri`` (no-op for file://)."""
    if uri.startswith("file://"):
        return
    for name in names:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            storage.upload_file(file, join_uri(uri, file.relative_to(root).as_posix()))
