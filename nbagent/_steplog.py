"""The step log: a step's commit (and an LLM call's reservation and settlement) as one
append to a file, moved into SQLite in batches.

A step commit through SQLite is a write transaction (BEGIN IMMEDIATE, an UPSERT,
COMMIT: a dozen system calls and SQLite's pager, B-tree and log code), and in a
notebook most of its cost is cold caches: ~0.1-0.2 ms a step. Here the same rows
are one ``pwrite`` to ``STORE/cache.db-steplog`` instead, as durable as SQLite's
write-ahead log in nbagent's setting (``synchronous = NORMAL``: a commit survives
its process being killed, and is in the file system's hands for a power loss).

Layout: a 4 KB header page, mapped into every process (``MAGIC``, the log's
generation, the end of its valid entries), then entries of ``(length, crc32)``
and a ``marshal`` of the rows (a dict of str to str, bytes or int: nothing but
data is read back; blobs stay signed; a key ``+ctr/...`` adds to a counter). An appender writes its entry at the end, then
moves the end past it, holding the log's lock (``flock`` on the file, and a
mutex for this process's threads): an entry is in the log once the end covers
it, so a process killed mid-write leaves bytes past the end that the next entry
overwrites.

The rows move into SQLite (:meth:`Store._fold`) at the start of every write
transaction, so SQLite's writes stay in commit order, and before every read, so
readers never miss a step (a reservation instead counts what waits here, under the
log's lock: Store.add_if). The fold records ``(generation, end)`` in SQLite in
its own transaction; after COMMIT the log restarts empty under a new generation
(if nothing was appended meanwhile), so a process killed between the two never
moves rows twice. Written by hand: ~150 lines of ``mmap`` and ``pwrite``; SQLite
remains the store (diskcache's database), this is its front door for steps and calls.
"""

from __future__ import annotations

import fcntl
import marshal
import mmap
import os
import secrets
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HEADER = 4096
MAGIC = int.from_bytes(b"NBALOG01", "little")  # the header's first word
_ENTRY = struct.Struct("<II")  # payload length, crc32 of the payload
_RESET_SIZE = 1 << 20  # a log grown past this is also cut back on disk when it restarts


def waiting_in_log(path: Path) -> bool:
    """Whether a step log holds entries, read without mapping it (for a process that cannot
    map files, which must not use a store whose other processes log steps)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return False
    if len(head) < 24:
        return False
    magic, _, end = struct.unpack("<QQQ", head)
    return bool(magic == MAGIC and end > HEADER)


class StepLog:
    """The step log of one store (see the module's doc). Its lock is its own; a process
    that holds both takes SQLite's write lock first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mutex = threading.Lock()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self.locked():
                if os.fstat(self.fd).st_size < HEADER:
                    os.ftruncate(self.fd, HEADER)
                self._map = mmap.mmap(self.fd, HEADER)
                self.head = memoryview(self._map).cast("Q")  # magic, generation, end
                if self.head[0] != MAGIC or not HEADER <= self.head[2]:
                    self.head[1], self.head[2] = self._generation(), HEADER
                    self.head[0] = MAGIC
        except BaseException:
            os.close(self.fd)
            raise

    @staticmethod
    def _generation() -> int:
        return secrets.randbits(63) + 1

    def pending(self) -> bool:
        """Whether entries wait to move into SQLite (one read of shared memory)."""
        return self.head[2] != HEADER

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self.mutex:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def append(self, rows: dict[str, Any]) -> None:
        """Add one entry; the caller holds :meth:`locked`."""
        payload = marshal.dumps(rows)
        end = self.head[2]
        data = _ENTRY.pack(len(payload), zlib.crc32(payload)) + payload
        if os.pwrite(self.fd, data, end) != len(data):  # a full disk writes short
            raise OSError(28, "No space left on device (short write)")
        self.head[2] = end + len(data)

    def start_after(self, done: Any, generation: int) -> int:
        """Where the entries not moved yet begin: after ``done`` (the ``[generation, end]``
        a fold got to, see Store._fold) if it is of this generation, else at the start."""
        if isinstance(done, list) and len(done) == 2 and done[0] == generation:
            return max(int(done[1]), HEADER)
        return HEADER

    def read(self, done: Any) -> tuple[int, int, list[dict[str, Any]], bool]:
        """``(generation, end, entries, damaged)``: the entries after ``done`` (see
        start_after). ``damaged``: an entry failed its check (a power loss, a damaged
        disk): it and the entries after it are left out."""
        with self.locked():  # the header as one: a restart writes both words
            generation, end = self.head[1], self.head[2]
        found, damaged = self.entries(self.start_after(done, generation), end)
        return generation, end, [rows for _, rows in found], damaged

    def entries(self, start: int, end: int) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
        """The entries between two offsets, each with the offset where it ends, and
        whether one failed its check (then it and those after it are left out)."""
        data = os.pread(self.fd, end - start, start) if end > start else b""
        found: list[tuple[int, dict[str, Any]]] = []
        at = 0
        while at < len(data):
            if at + _ENTRY.size > len(data):
                return found, True
            size, crc = _ENTRY.unpack_from(data, at)
            payload = data[at + _ENTRY.size : at + _ENTRY.size + size]
            if len(payload) != size or zlib.crc32(payload) != crc:
                return found, True
            try:
                rows = marshal.loads(payload)
            except (EOFError, ValueError, TypeError):
                return found, True
            if not (isinstance(rows, dict) and all(type(k) is str for k in rows)):
                return found, True
            at += _ENTRY.size + size
            found.append((start + at, rows))
        return found, False

    def restart(self, generation: int, end: int) -> None:
        """After the rows up to ``end`` were committed to SQLite: start the log empty,
        unless another entry came meanwhile (the next fold starts at ``end``)."""
        with self.locked():
            if self.head[1] == generation and self.head[2] == end:
                self.head[1] = self._generation()
                self.head[2] = HEADER
                if end > _RESET_SIZE:
                    os.ftruncate(self.fd, HEADER)

    def reopen(self) -> None:
        """In a forked child: a descriptor of its own (``flock`` is per open file)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(self.fd)
        self.fd = fd
        self.mutex = threading.Lock()

    def close(self) -> None:
        self.head.release()
        self._map.close()
        os.close(self.fd)
