"""Atomic writes with the user's umask, checks that an output can be written, and clean-up of temporaries.

A crash mid-write never leaves a half-written file under the final name; the temporary it leaves is
removed by a later write of the same file (once it is a minute old).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import ConfigError


def umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


def settle(path: str | Path) -> None:
    """Give `path` and everything under it the modes the user's umask asks for, and flush its files to disk.

    tempfile and safetensors create files 0600 and folders 0700 whatever the umask; results are meant
    to be shared like any file the user writes."""
    path = Path(path)
    mask = umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


STALE_SECONDS = 60  # an atomic write takes well under this: an older temporary was left by an interrupted one


def remove_temporaries(path: Path) -> None:
    """Delete the temporaries that an interrupted atomic write of `path` left beside it: exactly the names
    mkstemp gives them (".results.abc123.tmp" is another file's, ".results.json.abc12345.tmp" too), and only
    old ones (a concurrent write of the same file is still using its own)."""
    mine = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    for tmp in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.tmp"):
        try:
            if mine.fullmatch(os.path.basename(tmp)) and time.time() - os.path.getmtime(tmp) > STALE_SECONDS:
                os.unlink(tmp)
        except OSError:
            pass  # removed meanwhile, or not ours to remove: the write goes on


def _write_set(folder: Path, writers: dict[str, Callable[[str], None]]) -> list[Path]:
    """Write files of one folder (name -> a function writing it at the path given) as a set: every temporary
    first, then the renames. A write that fails (a full disk) leaves the folder's earlier files all as they were."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in writers:  # a rename onto a folder fails: refuse before replacing anything
        if (folder / name).is_dir():
            raise IsADirectoryError(errno.EISDIR, "a folder is in the way of a file to write", str(folder / name))
    temps: list[tuple[str, Path]] = []
    try:
        for name, write in writers.items():
            remove_temporaries(folder / name)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            temps.append((tmp, folder / name))
            write(tmp)
            settle(tmp)
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return [path for _, path in temps]


def write_files_atomic(folder: str | Path, files: dict[str, str | bytes]) -> list[Path]:
    """Several files of one folder (name -> text or bytes), written as a set (see _write_set)."""

    def writer(content: str | bytes) -> Callable[[str], None]:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        return write

    return _write_set(Path(folder), {name: writer(content) for name, content in files.items()})


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    write_files_atomic(path.parent, {path.name: text})


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    write_files_atomic(path.parent, {path.name: data})


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_safetensors_atomic(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    path = Path(path)
    _write_set(path.parent, {path.name: lambda tmp: save_tensors(tensors, tmp, metadata)})


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file for tensors on any device, shared or not (a state dict's views)."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def expand_user(path: str | Path) -> Path:
    """`path` with a leading ~ or ~user expanded, as a shell does, and otherwise as typed: Path('~x').expanduser()
    raises for an unknown user x, and Path() drops the "./" that keeps a folder named "~x" from being read as one."""
    return Path(os.path.expanduser(os.fspath(path)))


def check_output(path: str | Path, folder: bool = False, flag: str = "--output", reads: Iterable = (),
                 scans: Iterable = ()) -> Path:
    """Refuse, before any work, an output that cannot be written: a folder where a file is meant (or the
    reverse), a parent that is a file, a read-only or unwritable location, one of the files or folders the
    command reads (`reads`), or a place inside a folder whose files it reads (`scans`: task and data folders).
    An output would replace its own input there. Leaves nothing behind (a probe file is made and removed)."""
    path = expand_user(path)
    target = path.resolve()
    for source, inside in [*((r, False) for r in reads), *((d, True) for d in scans)]:
        given = None if source is None else expand_user(source)
        if given is None or not given.exists():
            continue  # a hub name, an alias, 'self', a file the loader would not find
        read = given.resolve()
        if target == read or (inside and read in target.parents):
            where = "over" if target == read else "inside"
            raise ConfigError(f"{flag} {path} would be written {where} {source}, which this command reads; "
                              f"choose another {flag}")
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; give a folder (it is created if missing)")
    if not folder and path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    existing = path.absolute() if folder else path.absolute().parent
    while not existing.exists():
        # A link to nowhere as a folder to create (the output folder, or one above the output) fails only at the
        # write, after the work: mkdir refuses it. (An output file that is one is replaced by the atomic rename.)
        if existing.is_symlink():
            raise ConfigError(f"{flag} {path} cannot be written: {existing} is a link to {os.readlink(existing)}, "
                              f"which does not exist; create its target or choose another {flag}")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "is not writable"
        raise ConfigError(f"{flag} {path} cannot be written: {existing} {why}; choose another {flag}")
    try:  # what the checks above cannot see: a pseudo file system such as /proc (root passes os.access), a full disk
        fd, probe = tempfile.mkstemp(prefix=".skipgpt-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path} cannot be written: nothing can be created in {existing} ({e.strerror}); "
                          f"choose another {flag}") from None
    return path


def same_place(a: Any, b: Any) -> bool:
    """Two spellings (relative, absolute, with ~, through a link) of one existing file or folder."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    pa, pb = expand_user(a), expand_user(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make the renames inside folder `path` durable (a power cut after it keeps them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
