"""Who may write a store: `prepare` writes only where nothing but a biofm store is, and one process at a time.

- `check_target`: an `--out` that exists and is not a biofm store (finished or unfinished) — a file, or a
  folder with anything in it — is refused with or without `--overwrite`, which replaces only a biofm store.
  Nothing of a user's is ever deleted: `--out .` or `--out` = the input's folder is an error, not an rm.
- `StoreLock`: `<store>.lock` beside the store names its writer (pid, host, start). Locally it is held with
  `flock`, which the kernel releases when the writer dies however it dies, so a stale lock never blocks a
  rerun. On object storage the lock file is created exclusively; one left by a dead process of this host
  is taken over, one of another host is named in the error with how to remove it.
- `writing(out, overwrite)` holds both for a whole prepare; `prepares` does so for a `prepare_*` function.
  Locks are re-entrant within a process (the prepare and its `StoreWriter` share one).
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from biofm.platform.errors import StoreError
from biofm.platform.integrity import is_local, local_path

_HELD: dict[str, list] = {}  # lock path → [StoreLock, hold count] of this process


def _is_store_metadata(raw: bytes) -> bool:
    try:
        attributes = json.loads(raw).get("attributes") or {}
    except (ValueError, AttributeError):
        return False
    return isinstance(attributes, dict) and "biofm_store" in attributes


def target_kind(url: str, storage_options: dict | None = None) -> str:
    """'absent', 'empty' (an empty folder), 'store' (a biofm store, finished or not), 'file' or 'other'."""
    if is_local(url):
        path = local_path(url)
        if not os.path.lexists(path):
            return "absent"
        if not os.path.isdir(path):
            return "file"
        if not os.listdir(path):
            return "empty"
        try:
            with open(os.path.join(path, "zarr.json"), "rb") as handle:
                return "store" if _is_store_metadata(handle.read()) else "other"
        except OSError:
            return "other"
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    if fs.isfile(root):
        return "file"
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return "absent"
    if not entries:
        return "empty"
    try:
        return "store" if _is_store_metadata(fs.cat_file(f"{root}/zarr.json")) else "other"
    except (FileNotFoundError, OSError):
        return "other"


def check_target(url: str, storage_options: dict | None = None) -> str:
    """Refuse an output that is not a biofm store (see the module's doc); returns its kind otherwise."""
    kind = target_kind(str(url), storage_options)
    if kind == "file":
        raise StoreError(
            f"{url} is a file, not a biofm store; prepare writes a store (a folder) and never "
            "replaces a file: choose another --out"
        )
    if kind == "other":
        raise StoreError(
            f"{url} is a folder that holds files but is not a biofm store; prepare never writes "
            "into it, with or without --overwrite (which replaces only a biofm store). Choose a "
            "new --out path, e.g. a folder name ending in .zarr that does not exist yet"
        )
    return kind


def lock_path(url: str) -> str:
    if is_local(url):
        return os.path.abspath(local_path(url)).rstrip("/") + ".lock"
    return str(url).rstrip("/") + ".lock"


def _owner() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """The one-writer lock of a store (see the module's doc)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.storage_options = str(url), storage_options
        self.path = lock_path(self.url)
        self.fd: int | None = None

    def _busy(self, owner: dict) -> StoreError:
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
        return StoreError(
            f"{self.url}: another biofm prepare is writing this store ({who}); wait for it to "
            f"finish, or write to another --out (lock: {self.path})"
        )

    def acquire(self) -> StoreLock:
        if is_local(self.url):
            self._acquire_local()
        else:
            self._acquire_remote()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
                except ValueError:
                    owner = {}
                os.close(fd)
                raise self._busy(owner) from None
            try:  # the previous owner may have removed the file after we opened it: lock the one at the path
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                data = json.dumps(_owner()).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                self.fd = fd
                return
            os.close(fd)
        raise StoreError(f"{self.url}: could not take the lock {self.path}; another process keeps replacing it")

    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.path, **(self.storage_options or {}))

    def _acquire_remote(self) -> None:
        fs, path = self._fs()
        for _ in range(2):
            if fs.exists(path):
                try:
                    owner = json.loads(fs.cat_file(path) or b"{}")
                except (ValueError, FileNotFoundError):
                    owner = {}
                if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
                    fs.rm(path)  # left by a writer of this host that died: stale
                    continue
                raise self._busy(owner)
            try:
                with fs.open(path, "xb") as handle:  # exclusive where the file system supports it (S3 does)
                    handle.write(json.dumps(_owner()).encode())
                return
            except FileExistsError:
                continue
            except (ValueError, NotImplementedError):  # no exclusive create: best effort after the check
                fs.pipe_file(path, json.dumps(_owner()).encode())
                return
        raise self._busy({})

    def release(self) -> None:
        if is_local(self.url):
            if self.fd is not None:
                try:
                    os.unlink(self.path)  # while still holding it, so no one takes a file about to vanish
                except FileNotFoundError:
                    pass
                os.close(self.fd)
                self.fd = None
        else:
            fs, path = self._fs()
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass


def hold(url: str, storage_options: dict | None = None) -> Callable[[], None]:
    """Take (or, in this process, share) the store's lock; returns the function that gives it back."""
    path = lock_path(str(url))
    held = _HELD.get(path)
    if held is None:
        held = _HELD[path] = [StoreLock(str(url), storage_options).acquire(), 0]
    held[1] += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        held[1] -= 1
        if held[1] == 0 and _HELD.get(path) is held:
            del _HELD[path]
            held[0].release()

    return release


@contextmanager
def writing(url: str, storage_options: dict | None = None) -> Iterator[None]:
    """Check that `url` may be written, and hold its lock while the block runs."""
    check_target(url, storage_options)
    release = hold(url, storage_options)
    try:
        check_target(url, storage_options)  # again under the lock: another writer may have started it
        yield
    finally:
        release()


def prepares(function: Callable) -> Callable:
    """Run a `prepare_*(…, out, …)` function inside `writing(out)`: before it reads its input or writes a
    side file, an `out` that is not a biofm store is refused and a second writer of the same store too."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        with writing(str(bound.arguments["out"])):
            return function(*args, **kwargs)

    return run
