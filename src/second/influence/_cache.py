"""An on-disk cache whose files are never half-written.

Every file is written to a temporary name in the same directory and moved into place
with :func:`os.replace`, which is atomic on POSIX and Windows: a reader sees either
the old file, the complete new one, or none. A crash mid-write leaves only a
``*.tmp`` file, which is never read and is cleaned up on the next write.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DiskCache", "fingerprint"]


def fingerprint(*items) -> str:
    """Digest tensors (bytes, shape, dtype), strings and numbers with SHA-256."""
    h = hashlib.sha256()
    for item in items:
        _update(h, item)
    return h.hexdigest()[:24]


def _update(h, item) -> None:
    if isinstance(item, Tensor):
        t = item.detach().cpu().contiguous()
        h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(item, (tuple, list)):
        h.update(f"L{len(item)}".encode())
        for x in item:
            _update(h, x)
    elif isinstance(item, dict):
        for k in sorted(item, key=str):
            _update(h, str(k))
            _update(h, item[k])
    else:
        h.update(repr(item).encode())


class DiskCache:
    """Tensors stored as ``<root>/<name>.pt``, written atomically.

    Args:
        root: the directory (created if missing).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """Where ``name`` is stored."""
        return self.root / f"{name}.pt"

    def save(self, name: str, obj) -> None:
        """Write ``obj`` (anything :func:`torch.save` takes) under ``name``, atomically."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(name))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, name: str):
        """Return the object stored under ``name``, or ``None`` if absent or unreadable."""
        p = self.path(name)
        if not p.exists():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # a file from another version or a corrupted disk: recompute it
            return None
