"""Every path a run reads or writes, local or a URI (gs://, s3://), through etils' epath, the
path type Orbax itself uses: `epath.Path(p)` reads, writes, lists and removes either kind.

This module holds what epath lacks: appending and cutting files (object stores have neither:
the whole object is rewritten, so a call costs the object's size; the run's logs are small),
an exclusive create for the workdir lock, copying trees, and `Scratch`, the local directory
for the libraries that take local paths only (ArrayRecord's reader and writer, safetensors'
memory-mapped reads, transformers' from_pretrained).

Object stores have no atomic rename: `epath.Path.rename` of a URI copies then deletes.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import weakref

import fsspec
from etils import epath

# gcsfs keeps directory listings forever by default, so files that another process or host
# wrote later (a lock, a checkpoint, the data store) would stay unseen: list afresh each time.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_uri(path) -> bool:
    """Whether `path` names an object in a store (gs://bucket/x), not a local file."""
    return "://" in os.fspath(path)


def absolute(path) -> str:
    """`path` made absolute (a URI is already)."""
    path = os.fspath(path)
    return path if is_uri(path) else os.path.abspath(path)


def join(path, *names: str) -> str:
    """`path`/`names`..., as a string; URIs keep their scheme."""
    return os.fspath(epath.Path(path).joinpath(*names))


def parent(path) -> str:
    """The directory holding `path` (a trailing slash ignored)."""
    return os.fspath(epath.Path(os.fspath(path).rstrip("/")).parent)


def size(path) -> int:
    """Bytes in file `path`; 0 when it does not exist."""
    p = epath.Path(path)
    return p.stat().length if p.exists() else 0


def mtime(path) -> float:
    """When file `path` was last modified (seconds since the epoch; whole seconds for a URI)."""
    return os.stat(path).st_mtime if not is_uri(path) else float(epath.Path(path).stat().mtime)


def append(path, text: str) -> None:
    """Appends `text` to file `path` (created when absent). A URI's object is rewritten whole."""
    if not is_uri(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    p = epath.Path(path)
    p.write_text((p.read_text(encoding="utf-8") if p.exists() else "") + text, encoding="utf-8")


def truncate(path, length: int) -> None:
    """Cuts file `path` to its first `length` bytes. A URI's object is rewritten."""
    if not is_uri(path):
        os.truncate(path, length)
        return
    p = epath.Path(path)
    p.write_bytes(p.read_bytes()[:length])


def create_exclusive(path, data: bytes) -> bool:
    """Writes `data` to a new file `path`; False, writing nothing, when it exists. Atomic on
    local disks and NFS (O_EXCL) and on GCS (fsspec's "xb": a create-if-absent precondition)."""
    if not is_uri(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if epath.Path(path).exists():  # also for stores (and emulators) that ignore the precondition
        return False
    try:
        with fsspec.open(os.fspath(path), "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def touch(path) -> None:
    """Sets file `path`'s modification time to now (a URI's object is rewritten)."""
    if is_uri(path):
        p = epath.Path(path)
        p.write_bytes(p.read_bytes())
    else:
        os.utime(path)


def files(root) -> list[str]:
    """Every file under directory `root`, at any depth, sorted. (epath's rglob refuses URIs and
    its walk drops their scheme.)"""
    out = []
    for child in epath.Path(root).iterdir():
        out.extend(files(child) if child.is_dir() else [os.fspath(child)])
    return sorted(out)


def copy_tree(src, dst, skip: tuple[str, ...] = ()) -> str:
    """Copies file or directory `src` to `dst` (either may be a URI), leaving out files whose
    name ends with one of `skip`; returns `dst`."""
    src, dst = epath.Path(src), epath.Path(dst)
    if not src.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.copy(dst, overwrite=True)
        return os.fspath(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in files(src):
        relative = f[len(os.fspath(src)) :].lstrip("/")
        if not (skip and f.endswith(skip)):
            (dst / relative).parent.mkdir(parents=True, exist_ok=True)
            epath.Path(f).copy(dst / relative, overwrite=True)
    return os.fspath(dst)


def resolve(root, relative: str = ".") -> tuple[str, bool]:
    """(`root`/`relative` with `..` and, locally, symlinks resolved; whether it stays under
    `root`)."""
    if is_uri(root):
        scheme, rest = os.fspath(root).rstrip("/").split("://", 1)
        full = posixpath.normpath(posixpath.join(rest, relative))
        return f"{scheme}://{full}", full == rest or full.startswith(rest + "/")
    root_real = os.path.realpath(os.fspath(root))
    full = os.path.realpath(os.path.join(root_real, relative))
    return full, os.path.commonpath([root_real, full]) == root_real


class Scratch:
    """A local directory for files that libraries read or write only as local files, made
    (on first use) under `base` (tempfile.gettempdir() when empty: --config.scratch_dir) and
    removed by `close()`, or when the object is collected or Python exits (a run that fails
    half-built leaves nothing; only SIGKILL does). Each process has its own."""

    def __init__(self, base: str = ""):
        self.base = base
        self.dir: str | None = None
        self._copies: dict[tuple[str, str], str] = {}
        self._remove = None

    def path(self, name: str) -> str:
        """A path named `name` inside the scratch directory (not created)."""
        if self.dir is None:
            if self.base:
                os.makedirs(self.base, exist_ok=True)
            self.dir = tempfile.mkdtemp(prefix="emor3_jax-", dir=self.base or None)
            self._remove = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        return os.path.join(self.dir, name)

    def local(self, path: str, name: str, skip: tuple[str, ...] = ()) -> str:
        """`path` itself when local, else its copy (file or tree, without files ending in
        `skip`) in the scratch directory as `name`, copied once."""
        if not path or not is_uri(path):
            return path
        key = (path, name)
        if key not in self._copies:
            self._copies[key] = copy_tree(path, self.path(name), skip)
        return self._copies[key]

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
        self.dir, self._copies, self._remove = None, {}, None
