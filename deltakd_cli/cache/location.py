"""Where a teacher cache lives: a directory on local disk or behind fsspec (`Location`), and the
names of the files in it. With the other cache modules and cache/schema.py, the only code that
touches zarr.

Layout of a cache directory (or fsspec URL) `CACHE/`:

    CACHE/settings.json               settings of the run that writes it (present from the start)
    CACHE/shards/shard-RRRRR-of-WWWWW.zarr/      one zarr v3 group per writer (rank)
    CACHE/shards/shard-RRRRR-of-WWWWW.progress.json   what that writer has committed
    CACHE/manifest.json               written last, atomically: a cache is complete iff it exists

docs/cache-format.md specifies every array (cache/schema.py holds the same in code).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import zarr

from deltakd_cli.errors import DeltakdError
from deltakd_cli.outputs import (
    atomic_write_text,
    is_url,
    local_path,
    writing,
)

SETTINGS_FILE = "settings.json"  # the settings of the run writing the cache (resume compares)
VOCABULARY_FILE = "vocabulary.json"  # the token string of every id the cache uses


def is_storage_error(error: BaseException) -> bool:
    """An I/O or network failure (the error or what caused it): OSError (connection refused,
    timeouts), botocore's and aiohttp's errors. Bytes that fail to decode are not one."""
    kinds: list[type] = [OSError]
    # Only a library already loaded can have raised its errors: nothing is imported for this.
    for module, name in (
        ("botocore.exceptions", "BotoCoreError"),
        ("botocore.exceptions", "ClientError"),
        ("aiohttp", "ClientError"),
    ):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):
            kinds.append(getattr(loaded, name))
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, tuple(kinds)):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class Location:
    """A directory on local disk or behind fsspec, with the few file operations the cache needs.
    Local writes go through a temp file and a rename, so a reader never sees half a file; every
    name is checked to stay inside the directory."""

    def __init__(self, root: str):
        self.url = is_url(root)
        self.root = (root if self.url else local_path(root)).rstrip("/") or "/"
        self._fs: Any = None
        self._fs_pid = 0
        if self.url:
            self.fs_root = self._open()

    def _open(self) -> str:
        try:
            import fsspec
        except ImportError:
            raise DeltakdError(
                f"{self.root}: URLs need fsspec (pip install fsspec) and the scheme's backend "
                "(e.g. pip install s3fs)"
            ) from None
        try:
            self._fs, fs_root = fsspec.core.url_to_fs(self.root)
        except (ImportError, ValueError) as error:
            raise DeltakdError(f"{self.root}: cannot open this URL ({error})") from None
        self._fs_pid = os.getpid()
        return fs_root

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of a URL, opened in this process: a forked DataLoader worker
        opens its own (an async client such as s3fs's belongs to its parent's event loop and
        does not survive a fork)."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._open()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:  # a spawned process opens its own filesystem
        return {**self.__dict__, "_fs": None, "_fs_pid": 0}

    def join(self, *parts: str) -> str:
        for part in parts:
            if part.startswith("/") or ".." in part.split("/") or "\\" in part:
                raise DeltakdError(f"{self.root}: refusing the path {part!r} (outside the cache)")
        return "/".join([self.root, *parts])

    def _path(self, relative: str) -> str:
        return f"{self.fs_root.rstrip('/')}/{relative}" if self.url else self.join(relative)

    def exists(self, relative: str = "") -> bool:
        if self.url:
            return self.fs.exists(self._path(relative) if relative else self.fs_root)
        return Path(self.join(relative) if relative else self.root).exists()

    def read_text(self, relative: str) -> str:
        if self.url:
            with self.fs.open(self._path(relative), "r") as handle:
                return handle.read()
        return Path(self.join(relative)).read_text()

    def write_text(self, relative: str, text: str) -> None:
        if self.url:
            with writing(self.join(relative), len(text)):
                self.fs.makedirs(self._path(relative).rsplit("/", 1)[0], exist_ok=True)
                with self.fs.open(self._path(relative), "w") as handle:
                    handle.write(text)
            return
        atomic_write_text(self.join(relative), text)

    def remove(self, relative: str) -> None:
        if self.url:
            if self.fs.exists(self._path(relative)):
                self.fs.rm(self._path(relative), recursive=True)
            return
        import shutil

        target = Path(self.join(relative))
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    def list(self, relative: str = "") -> list[str]:
        """Names directly under `relative` (empty when it does not exist)."""
        if self.url:
            path = self._path(relative) if relative else self.fs_root
            if not self.fs.exists(path):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        target = Path(self.join(relative) if relative else self.root)
        return sorted(p.name for p in target.iterdir()) if target.is_dir() else []

    def files_under(self, relative: str) -> list[str]:
        """Every file below `relative`, as paths relative to it, sorted."""
        if self.url:
            base = self._path(relative)
            found = self.fs.find(base)
            return sorted(p[len(base.rstrip("/")) + 1 :] for p in found)
        base = Path(self.join(relative))
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def read_bytes(self, relative: str) -> bytes:
        if self.url:
            with self.fs.open(self._path(relative), "rb") as handle:
                return handle.read()
        return Path(self.join(relative)).read_bytes()

    def zarr_store(self, relative: str, read_only: bool = False) -> Any:
        if self.url:
            return zarr.storage.FsspecStore.from_url(self.join(relative), read_only=read_only)
        return zarr.storage.LocalStore(self.join(relative), read_only=read_only)
