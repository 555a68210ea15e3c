"""An on-disk cache whose files are never half-written, and never trusted blindly.

Every file is written to a temporary name in the same directory and moved into place
with :func:`os.replace`, which is atomic on POSIX and Windows: a reader sees either
the old file, the complete new one, or none. A crash mid-write leaves only a
``.*.tmp`` file, which is never read; creating a :class:`DiskCache` removes the ones
older than :data:`STALE_TMP_SECONDS` (one hour: a live writer renames its file within
seconds, so an older one belongs to a writer that died).

Tensors are stored as *blocks* (:meth:`DiskCache.save_block`, a ``.pt`` file) or as named
groups of tensors in a ``.safetensors`` file (:meth:`DiskCache.save_tensors`: the fitted
Kronecker factors, the streamed score blocks): the tensor with the name
it was made for, a SHA-256 digest of its bytes, and optional metadata. :meth:`DiskCache.
load_block` (:meth:`DiskCache.load_tensors`) returns the tensor(s) only if all of these match what the caller expects (name,
shape, dtype, metadata and digest); anything else (a truncated, corrupted, mislabeled or
forged file, one from another version) is reported with a warning and treated as absent,
so the caller recomputes it. The digest detects accidental damage and files copied
under another name; it is not a signature: whoever can write the cache directory can
also write a consistent forgery, so the directory must be as trusted as the code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .._errors import outside_stacklevel

__all__ = ["DiskCache", "fingerprint", "chunk_digest", "STALE_TMP_SECONDS", "CacheStore"]

STALE_TMP_SECONDS = 3600.0
_FORMAT = 4
"""The cache format; 3 since the factors of losses whose curvature depends on the targets
(ignored targets, class weights, label smoothing) are computed from them; 4 since
:func:`fingerprint` tags every item with its type and length (keys of different settings
could collide before): files of earlier versions are recomputed."""


def fingerprint(*items) -> str:
    """Digest tensors (bytes, shape, dtype), strings and numbers with SHA-256."""
    h = hashlib.sha256()
    for item in items:
        _update(h, item)
    return h.hexdigest()[:24]


def chunk_digest(chunk) -> str:
    """The digest of a chunk's tensors (a pair digests as its two tensors, as before)."""
    return fingerprint(*chunk) if isinstance(chunk, (tuple, list)) else fingerprint(chunk)


def _update(h, item) -> None:
    """Feed ``item`` to ``h`` unambiguously.

    Every item starts with a type tag, and every variable-length part (a string, the
    bytes of a tensor, a list, a dict) with its length, so that no two different
    sequences of items hash the same bytes (``0.01, 52`` and ``0.015, 2`` did).
    """
    if isinstance(item, Tensor):
        t = item.detach().cpu().contiguous()
        _tagged(h, b"T", f"{tuple(t.shape)}{t.dtype}".encode())
        data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
        _tagged(h, b"B", data)  # the bytes through the buffer protocol: no copy
    elif isinstance(item, (tuple, list)):
        h.update(b"L" if isinstance(item, list) else b"U")
        h.update(len(item).to_bytes(8, "little"))
        for x in item:
            _update(h, x)
    elif isinstance(item, dict):
        h.update(b"D" + len(item).to_bytes(8, "little"))
        for k in sorted(item, key=str):
            _update(h, str(k))
            _update(h, item[k])
    elif isinstance(item, str):
        _tagged(h, b"S", item.encode("utf-8", "surrogatepass"))
    elif isinstance(item, bytes):
        _tagged(h, b"Y", item)
    else:  # numbers, None, booleans, dtypes ...: the type's name tags the repr
        _tagged(h, b"R" + type(item).__qualname__.encode(), repr(item).encode())


def _tagged(h, tag: bytes, data) -> None:
    """``tag``, the length of ``data`` and ``data``."""
    h.update(tag)
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


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
        self._write(self.path(name), name, lambda f: torch.save(obj, f))

    def _write(self, path: Path, name: str, write) -> None:
        """``write(f)`` to a temporary file, flushed to disk, then moved onto ``path``."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
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

    # -- groups of tensors in safetensors files ----------------------------------------------
    def tensors_path(self, name: str) -> Path:
        """Where the tensors saved under ``name`` by :meth:`save_tensors` are stored."""
        return self.root / f"{name}.safetensors"

    def save_tensors(self, name: str, tensors: dict[str, Tensor], meta: dict | None = None) -> None:
        """Store named tensors in ``<name>.safetensors``, atomically, with a digest and ``meta``.

        The file's metadata holds the format, ``name``, ``meta`` (as JSON) and the digest of
        every tensor (names, shapes, dtypes and bytes), checked by :meth:`load_tensors`.
        """
        ts = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        header = {
            "format": str(_FORMAT),
            "name": name,
            "meta": json.dumps(dict(meta or {}), sort_keys=True, default=str),
            "digest": fingerprint(ts),
        }
        self._write(self.tensors_path(name), name, lambda f: _write_safetensors(f, ts, header))

    def load_tensors(
        self, name: str, meta: dict | None = None, shapes: dict[str, tuple] | None = None
    ) -> dict[str, Tensor] | None:
        """The tensors stored under ``name`` if they are exactly what the caller expects.

        Checked: written by :meth:`save_tensors` for this ``name`` and ``meta``, every
        tensor's bytes match the digest, and (when given) the names and shapes are
        ``shapes``. A file that fails a check is reported (``UserWarning``) and ignored;
        an absent one gives ``None``.
        """
        p = self.tensors_path(name)
        if not p.exists():
            return None
        try:
            header, ts = _read_safetensors(p)
        except Exception:
            self._reject(name, "it cannot be read", p)
            return None
        why = None
        want_meta = json.dumps(dict(meta or {}), sort_keys=True, default=str)
        if header.get("format") != str(_FORMAT):
            why = "it is not a file written by this version"
        elif header.get("name") != name:
            why = f"it was written for {header.get('name')!r}"
        elif header.get("meta") != want_meta:
            why = "it was written for other data"
        elif header.get("digest") != fingerprint(ts):
            why = "its content does not match its digest"
        elif shapes is not None and {k: tuple(t.shape) for k, t in ts.items()} != {
            k: tuple(v) for k, v in shapes.items()
        }:
            why = "it holds tensors of other names or shapes"
        if why is not None:
            self._reject(name, why, p)
            return None
        return ts

    def _reject(self, name: str, why: str, path: Path | None = None) -> None:
        warnings.warn(
            f"ignoring cache file {path or self.path(name)}: {why}; recomputing it",
            UserWarning,
            stacklevel=outside_stacklevel(),
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


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(f, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` in the safetensors format, each straight from its memory (no copy).

    The format: an 8-byte little-endian header length, a JSON header (per tensor its
    dtype, shape and byte range; ``__metadata__``) padded to 8 bytes, then the bytes.
    """
    header: dict = {"__metadata__": metadata}
    off = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [off, off + n],
        }
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for t in tensors.values():
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and tensors of a safetensors file, mapped from disk (no third-party reader).

    The file is mapped copy-on-write (:func:`torch.from_file`); each tensor is a view of
    its byte range, copied only when that range is not aligned to its element size.
    Raises ``ValueError`` on a malformed file (short, a header that is not JSON, byte
    ranges outside the file or overlapping, an unknown dtype).
    """
    size = path.stat().st_size
    if size < 8:
        raise ValueError("shorter than a safetensors header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    body = size - 8 - n
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)[8 + n :]
    ts: dict[str, Tensor] = {}
    end = 0
    for k, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = _ST_NAMES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        lo, hi = (int(o) for o in info["data_offsets"])
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if lo < end or hi > body or hi - lo != numel * itemsize:
            raise ValueError(f"tensor {k!r} has a bad byte range")
        end = hi
        raw = data[lo:hi]
        if (8 + n + lo) % itemsize:
            raw = raw.clone()
        ts[k] = raw.view(dtype).reshape(shape)
    return meta, ts


class CacheStore:
    """The stages of one computation in a :class:`DiskCache`: ``save(stage, tensors)``, ``load(stage)``.

    Args:
        cache: the cache (``None``: nothing is stored, :meth:`load` returns ``None``).
        key: what the stored tensors depend on (part of every file name).
        meta: checked on load (see :meth:`DiskCache.load_tensors`).
    """

    def __init__(self, cache: DiskCache | None, key: str, meta: dict | None = None):
        self.cache, self.key, self.meta = cache, key, dict(meta or {})

    def load(self, stage: str) -> dict[str, Tensor] | None:
        """The tensors of ``stage``, or ``None``."""
        if self.cache is None:
            return None
        return self.cache.load_tensors(f"{stage}-{self.key}", self.meta)

    def save(self, stage: str, tensors: dict[str, Tensor]) -> None:
        """Store the tensors of ``stage`` (atomically)."""
        if self.cache is not None:
            self.cache.save_tensors(f"{stage}-{self.key}", tensors, self.meta)
