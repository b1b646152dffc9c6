"""Outputs that are either complete or absent: a killed stage never leaves a half-written file or directory.

Files are written to a temporary name in the same directory and renamed (atomic on POSIX). A directory output
is built beside its destination and swapped in at the end. Long stages write into a resumable work directory
(``ResumableDir``) whose finished parts survive a kill and are reused only if they were made from the same
inputs and parameters (its fingerprint).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; it is renamed to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing what was there.

    Two renames: the old output is moved aside first and deleted only after the new one is in place, so a
    crash between them leaves both (``.<name>.old-<pid>`` beside ``dst``) and loses nothing.
    """
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dst``; swap it in for ``dst`` if the block succeeds."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (parameters, input file stats)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def files_fingerprint(root: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file under ``root``: cheap to compute, changes when inputs change."""
    root = Path(root)
    return [
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


class ResumableDir:
    """A directory output built part by part, resumable after a kill.

    Parts are written atomically into ``.<name>.partial`` beside the destination. On a rerun with the same
    fingerprint the finished parts are kept; with another fingerprint (new inputs or parameters) the work
    directory is emptied first. ``finish()`` swaps the work directory in as the destination.
    """

    def __init__(self, dst: str | os.PathLike, fingerprint: str):
        self.dst = Path(dst)
        self.work = self.dst.with_name(f".{self.dst.name}.partial")
        stamp = self.work / ".fingerprint"
        if self.work.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            write_bytes(stamp, fingerprint.encode())

    @classmethod
    def join(cls, dst: str | os.PathLike, fingerprint: str) -> ResumableDir:
        """The work directory another process of the same job opened with ``fingerprint``: never cleared here, so
        a rank cannot delete shards the others are writing; a different fingerprint is an error."""
        work = cls.__new__(cls)
        work.dst = Path(dst)
        work.work = work.dst.with_name(f".{work.dst.name}.partial")
        stamp = work.work / ".fingerprint"
        found = stamp.read_text() if stamp.exists() else None
        if found != fingerprint:
            raise RuntimeError(
                f"{work.work} was opened for other inputs or parameters ({found}, this process: {fingerprint}): do "
                "all ranks see the same files?"
            )
        return work

    def done(self, name: str) -> bool:
        return (self.work / name).exists()

    def path(self, name: str) -> Path:
        return self.work / name

    def finish(self) -> Path:
        """Swap the finished work directory in. Every part is done by now (all ranks are past their last write),
        so a half-written ``.<part>.tmp-<pid>`` left is a killed process's: it must not reach the output."""
        (self.work / ".fingerprint").unlink()
        for leftover in self.work.rglob(".*.tmp-*"):
            leftover.unlink()
        replace_dir(self.work, self.dst)
        return self.dst


class Busy(RuntimeError):
    """Another process holds the lock: the work it guards is already being done."""


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` for the block, or raise ``Busy`` saying who holds it.

    An ``flock``: the kernel drops it when its holder exits, however it exits, so the file a killed run leaves
    behind never blocks the next one. The file keeps the holder's pid, host and start time for the message.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process"
            raise Busy(
                f"{what} is already running in this workspace ({holder}; lock file {lock}): wait for it to end or "
                "stop it; two runs at once would write over each other's outputs"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {stamp}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
