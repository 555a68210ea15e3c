"""An on-disk cache whose files are never half-written, and never trusted blindly.

Every file is written to a temporary name in the same directory and moved into place
with :func:`os.replace`, which is atomic on POSIX and Windows: a reader sees either
the old file, the complete new one, or none. A crash mid-write leaves only a
``.*.tmp`` file, which is never read; creating a :class:`DiskCache` removes the ones
older than :data:`STALE_TMP_SECONDS` (one hour: a live writer renames its file within
seconds, so an older one belongs to a writer that died).

Tensors are stored as *blocks* (:meth:`DiskCache.save_block`): the tensor with the name
it was made for, a SHA-256 digest of its bytes, and optional metadata. :meth:`DiskCache.
load_block` returns the tensor only if all of these match what the caller expects (name,
shape, dtype, metadata and digest); anything else (a truncated, corrupted, mislabeled or
forged file, one from another version) is reported with a warning and treated as absent,
so the caller recomputes it. The digest detects accidental damage and files copied
under another name; it is not a signature: whoever can write the cache directory can
also write a consistent forgery, so the directory must be as trusted as the code.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DiskCache", "fingerprint", "STALE_TMP_SECONDS"]

STALE_TMP_SECONDS = 3600.0
_FORMAT = 2


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
    """Tensors stored as ``<root>/<name>.pt``, written atomically and checked on load.

    Args:
        root: the directory (created if missing). Temporary files of crashed writers
            older than :data:`STALE_TMP_SECONDS` are removed.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_tmp()

    def remove_stale_tmp(self, age: float = STALE_TMP_SECONDS) -> list[Path]:
        """Remove ``.*.tmp`` files last modified more than ``age`` seconds ago; return them."""
        now, removed = time.time(), []
        for p in self.root.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime > age:
                    p.unlink()
                    removed.append(p)
            except OSError:  # another process removed or renamed it first
                pass
        return removed

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
            self._reject(name, "it cannot be read")
            return None

    def save_block(self, name: str, tensor: Tensor, meta: dict | None = None) -> None:
        """Store ``tensor`` under ``name`` with its digest, its name and ``meta``."""
        t = tensor.detach().cpu().contiguous()
        self.save(
            name,
            {
                "format": _FORMAT,
                "name": name,
                "meta": dict(meta or {}),
                "digest": fingerprint(t),
                "tensor": t,
            },
        )

    def load_block(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        meta: dict | None = None,
    ) -> Tensor | None:
        """The tensor stored under ``name`` if it is exactly what the caller expects, else ``None``.

        Checked: the file was written by :meth:`save_block` for this ``name``, with this
        ``meta``; the tensor has this ``shape`` and ``dtype``; its bytes match the stored
        digest. A file that fails a check is reported (``UserWarning``) and ignored.
        """
        obj = self.load(name)
        if obj is None:
            return None
        why = _invalid(obj, name, tuple(shape), dtype, dict(meta or {}))
        if why is not None:
            self._reject(name, why)
            return None
        return obj["tensor"]

    def _reject(self, name: str, why: str) -> None:
        warnings.warn(
            f"ignoring cache file {self.path(name)}: {why}; recomputing it",
            UserWarning,
            stacklevel=4,
        )


def _invalid(obj, name: str, shape: tuple, dtype: torch.dtype, meta: dict) -> str | None:
    """Why a loaded block is not the expected one (``None`` when it is)."""
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        return "it is not a block written by this version"
    if obj.get("name") != name:
        return f"it was written for {obj.get('name')!r}"
    if obj.get("meta") != meta:
        return "it was written for other data"
    t = obj.get("tensor")
    if not isinstance(t, Tensor):
        return "it holds no tensor"
    if tuple(t.shape) != shape or t.dtype != dtype:
        return f"it holds a {tuple(t.shape)} {t.dtype} tensor, expected {shape} {dtype}"
    if obj.get("digest") != fingerprint(t):
        return "its content does not match its digest"
    return None
