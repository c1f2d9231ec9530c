"""A store's files and their checksums: what tells a damaged store from data.

`StoreWriter.finalize` writes `biofm.checksums.json` — the size and SHA-256 of every file of the store but
the root's own metadata — before it marks the store complete. Every chunk is written, even one that holds
only the fill value, so a missing file is always damage. Opening a store compares the sizes with one
listing of its files (a missing or truncated chunk is named, with its array); `biofm verify` also reads
every file and compares its checksum. Compressed chunks also carry zstd's own content checksum, so a
corrupt one fails when it is decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from biofm.platform.errors import StoreError

MANIFEST = "biofm.checksums.json"
BLOCK = 1 << 20


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def local_path(url: str) -> str:
    url = str(url)
    return url[len("file://") :] if url.startswith("file://") else url


def _remote(url: str, storage_options: dict | None):
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/")


def _own(key: str) -> bool:
    """Files that belong in the manifest: zarr's, not the root metadata (rewritten when the store is
    marked complete), not the manifest, not an unfinished prepare's parts, not temporary files."""
    name = key.rsplit("/", 1)[-1]
    return key not in ("zarr.json", MANIFEST) and not key.startswith("_parts/") and not name.startswith(".")


def list_files(url: str, storage_options: dict | None = None) -> dict[str, int]:
    """Every file of the store (key relative to its root → size in bytes), with one listing."""
    if is_local(url):
        root = local_path(url)
        files: dict[str, int] = {}
        stack = [""]
        while stack:
            prefix = stack.pop()
            try:
                entries = list(os.scandir(os.path.join(root, prefix) if prefix else root))
            except FileNotFoundError:
                continue
            for entry in entries:
                key = f"{prefix}/{entry.name}" if prefix else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(key)
                else:
                    files[key] = entry.stat(follow_symlinks=False).st_size
        return files
    fs, root = _remote(url, storage_options)
    found = fs.find(root, detail=True)
    return {path[len(root) :].lstrip("/"): int(info.get("size") or 0) for path, info in found.items()}


def describe(key: str) -> str:
    """'chunk (3, 0) of array 'molecule/x'' for a chunk file's key, 'the metadata of …' for zarr.json."""
    parts = key.split("/")
    if parts[-1] == "zarr.json":
        return f"the metadata of '{'/'.join(parts[:-1]) or '/'}'"
    end = len(parts)
    while end > 0 and parts[end - 1].isdigit():
        end -= 1
    if 0 < end < len(parts) and parts[end - 1] == "c":
        index = ", ".join(parts[end:])
        return f"chunk ({index}{',' if len(parts) - end == 1 else ''}) of array '{'/'.join(parts[: end - 1])}'"
    return f"file '{key}'"


def _open(url: str, key: str, storage_options: dict | None):
    if is_local(url):
        return open(os.path.join(local_path(url), *key.split("/")), "rb")
    fs, root = _remote(url, storage_options)
    return fs.open(f"{root}/{key}", "rb")


def _sha256(url: str, key: str, storage_options: dict | None) -> str:
    digest = hashlib.sha256()
    with _open(url, key, storage_options) as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(url: str, storage_options: dict | None = None) -> dict[str, list]:
    """Size and SHA-256 of every file of the store (see `_own`), written to `MANIFEST` atomically."""
    files = {key: size for key, size in sorted(list_files(url, storage_options).items()) if _own(key)}
    entries = {key: [size, _sha256(url, key, storage_options)] for key, size in files.items()}
    written = json.dumps({"algorithm": "sha256", "files": entries}, separators=(",", ":"))
    if is_local(url):
        path = os.path.join(local_path(url), MANIFEST)
        with open(path + ".tmp", "w") as handle:
            handle.write(written)
        os.replace(path + ".tmp", path)
    else:
        fs, root = _remote(url, storage_options)
        fs.pipe(f"{root}/{MANIFEST}", written.encode())
    return entries


def read_manifest(url: str, storage_options: dict | None = None) -> dict[str, list]:
    try:
        with _open(url, MANIFEST, storage_options) as handle:
            manifest = json.loads(handle.read())
        return dict(manifest["files"])
    except FileNotFoundError:
        raise StoreError(
            f"{url}: the store has no {MANIFEST} (the checksums of its files); it is damaged or "
            "was written by an older biofm — prepare it again"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(
            f"{url}: {MANIFEST} cannot be read ({type(err).__name__}); the store is damaged — prepare it again"
        ) from None


def size_problems(url: str, manifest: dict[str, list], files: dict[str, int]) -> list[str]:
    """A line per file of the manifest that is missing or has another size than it was written with."""
    problems = []
    for key, (size, _) in manifest.items():
        if key not in files:
            problems.append(f"{url}: {describe(key)} is missing (file {key})")
        elif files[key] != size:
            problems.append(
                f"{url}: {describe(key)} is {files[key]} bytes but was written as {size} bytes "
                f"(file {key}): it is truncated or damaged"
            )
    return problems


def check_files(url: str, storage_options: dict | None = None) -> None:
    """On open: every file the store was written with is there, at its size (one listing, no reads)."""
    problems = size_problems(url, read_manifest(url, storage_options), list_files(url, storage_options))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(
            f"{problems[0]}{more}; the store is damaged — prepare it again "
            f"(`biofm verify {url}` lists every damaged file)"
        )


def verify(url: str, storage_options: dict | None = None, progress: bool = False) -> dict[str, Any]:
    """Every file's size and SHA-256 against the manifest: {'files', 'bytes', 'problems'}."""
    manifest = read_manifest(url, storage_options)
    files = list_files(url, storage_options)
    problems = size_problems(url, manifest, files)
    broken = {p.rsplit("(file ", 1)[1].split(")")[0] for p in problems}
    keys = [k for k in manifest if k not in broken]
    if progress:
        from rich.progress import track

        keys = track(keys, description="verifying")
    for key in keys:
        if _sha256(url, key, storage_options) != manifest[key][1]:
            problems.append(
                f"{url}: {describe(key)} does not match its checksum (file {key}): its contents "
                "changed after it was written"
            )
    return {"files": len(manifest), "bytes": int(sum(size for size, _ in manifest.values())), "problems": problems}
