"""The on-disk ledger: runs, steps, variable blobs, outputs, spend and the trace.

Layout of a store directory (created private to the user, mode 0700)::

    STORE/cache.db    one SQLite database, shared by diskcache and nbagent:
                      ``records``  step records, small value blobs, counters, run
                                   records and ledgers (key -> JSON text, an
                                   integer or signed bytes); one row each
                      ``trace``    the append-only trace (one row per LLM attempt,
                                   tool call, step outcome, cap change and alert)
                      ``Cache``    diskcache's: the store's identity and format
                                   (``meta/*``) and the large values (32 KB and
                                   more), kept as files under STORE/
    STORE/cache.db-locks  step locks (POSIX record locks; the file stays empty)
    STORE/cache.db-versions  per-run change counters of step and run records, mapped
                      into every process (so a step can begin without a read)

Why tables beside diskcache's: a step commit writes its record, its small values,
its trace row and the run's step count in one transaction, and the pages it
writes are most of its cost; diskcache's table has two indexes and five triggers
(over eight pages per step commit; four with ``records``, the trace row and the
count waiting as one more row, see Store.commit_step). The trace is scanned
whole to build a DataFrame (100k rows in well under a second with one SQL
query). diskcache keeps what it is best at: values in files, written before the
row that names them, never rewritten in place. Writes are crash-safe: every
write is one SQLite transaction, so a SIGKILL leaves either the old or the new
entry, never half of one. Nothing in the store is a pickle that diskcache would
unpickle on read. (Format 1 kept the trace in ``trace.sqlite3``; format 3 and
older kept the records in diskcache's table: opening such a store moves them.)

Variable blobs are pickles, and unpickling runs code, so every blob carries a
signature (keyed BLAKE3, a MAC; format 2 used HMAC-SHA256) made with a
per-store key kept *outside* the store (``~/.local/share/nbagent/keys``, or
``NBAGENT_KEY_DIR``). A blob whose signature does not verify is never
unpickled. Large values keep their bulk data (NumPy and pandas buffers) out of
the pickle stream, so restoring them reads the file once and unpickles in place.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import hmac
import io
import itertools
import json
import json.encoder
import mmap
import os
import secrets
import socket
import sqlite3
import struct
import sys
import threading
import time
import uuid
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import diskcache

from ._errors import StepLockedError, StoreError, StoreFormatError
from ._steplog import HEADER as _LOG_EMPTY
from ._steplog import StepLog, waiting_in_log

#: Version of the on-disk layout. Bump it (and keep a fixture of the old
#: layout under tests/) when a key or a record changes shape. Older stores are
#: upgraded when opened (see ``Store._upgrade``).
#:
#: 2: step locks are file locks (no ``lock/`` rows); no step index
#: (``ctr/RUN/step_seq``, ``stepidx/RUN/N``): steps are listed by rowid; the
#: trace table is in ``cache.db`` (it was ``trace.sqlite3``).
#: 3: value blobs are signed with keyed BLAKE3 (``NBA2``, a 48-byte head) and may hold
#: pickle-5 out-of-band buffers; format 2's blobs are still read.
#: 4: every entry but ``meta/*`` and value files is a row of the ``records`` table, not of
#: diskcache's ``Cache``; the trace's ``seq`` is a plain rowid (no AUTOINCREMENT).
#: 5: writers of step and run records count them in ``cache.db-versions`` (see _Versions);
#: a step's trace row and step count may wait as a ``pend/`` record (see Store.commit_step).
#: 6: a step's commit may wait in ``cache.db-steplog`` (see _steplog); the records table
#: holds where its moves got to (``log/folded``).
FORMAT_VERSION = 6

#: Money is kept as integer nano-dollars so counters can be incremented
#: atomically by diskcache (which only increments integers).
NANO = 1_000_000_000

#: ``Store.commit_step(previous=UNREAD)``: the step's earlier record is not known; read it.
UNREAD: Any = type("Unread", (), {"__repr__": lambda self: "UNREAD"})()

#: A value blob: ``NBA2``, 12 zero bytes, the keyed BLAKE3 of the payload (32 bytes), the
#: payload. The 48-byte head keeps the payload 16-byte aligned in memory (pickle-5
#: out-of-band buffers are read in place, see _engine.loads_value). Format 2's blobs
#: (``NBA1``, HMAC-SHA256, 36-byte head) are still read.
_BLOB_MAGIC = b"NBA2"
_BLOB_HEAD = 48
_OLD_BLOB_MAGIC = b"NBA1"
_SIG_LEN = 32


class _NoPickleDisk(diskcache.Disk):
    """diskcache's Disk that refuses to unpickle: nbagent only stores str, int and bytes.

    diskcache unpickles any value it stored in pickle mode, before nbagent could
    check a signature; an entry planted that way must never run code on read.
    """

    def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_PICKLE:
            raise StoreError(
                f"an entry in the nbagent store at {self._directory} is a pickle that nbagent "
                "did not write (it was changed by someone else). It was not loaded. Move the "
                "store aside and start again with a fresh --store folder."
            )
        return super().fetch(mode, filename, value, read)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        try:
            return super().store(value, read, key=key)
        except OSError as e:
            raise store_error(e, self._directory) from e

    def _write(self, full_path: str, iterator: Any, mode: str, encoding: Any = None) -> Any:
        if isinstance(iterator, io.BytesIO | io.StringIO):
            # diskcache passes a value as BytesIO and iterates it, which splits it at every
            # b"\n": ~300,000 writes per 100 MB of pickled floats. One write instead (getvalue
            # returns the bytes the BytesIO was made from, no copy).
            iterator = (iterator.getvalue(),)
        try:
            return super()._write(full_path, iterator, mode, encoding)
        except OSError:  # e.g. a full disk: do not leave half a value file taking space
            if "x" in mode:  # the file was new: it is this write's
                with contextlib.suppress(OSError):
                    os.remove(full_path)
            raise


def store_error(error: BaseException, path: Any) -> StoreError:
    """A clear StoreError (naming the store and the fix) for a disk or SQLite failure."""
    text = str(error)
    low = text.lower()
    if "full" in low or getattr(error, "errno", None) == errno.ENOSPC:
        return StoreError(
            f"the disk holding the nbagent store at {path} is full ({text}). Nothing was stored "
            "for this step and what was stored before is kept: free some space and run it again."
        )
    if "readonly" in low or "read-only" in low or getattr(error, "errno", None) == errno.EROFS:
        return StoreError(
            f"the nbagent store at {path} is read-only ({text}). Point nbagent at a writable "
            "folder with --store DIR or NBAGENT_DIR."
        )
    return StoreError(
        f"the nbagent store at {path} is damaged or not a store ({text}). Move it aside and "
        "start again with a fresh --store folder (or restore it from a backup)."
    )


class _Cache(diskcache.Cache):
    """diskcache's Cache whose failures are StoreErrors naming the store and the fix.

    Translated: a damaged database file, a full disk, a read-only store (diskcache would
    retry BEGIN IMMEDIATE on a read-only database for ever). Other OperationalErrors
    ("database is locked", "no such table") stay: diskcache handles them itself.
    """

    @property
    def _sql(self) -> Any:
        execute = self._con.execute
        directory = self._directory

        def sql(*args: Any, **kwargs: Any) -> Any:
            try:
                return execute(*args, **kwargs)
            except sqlite3.DatabaseError as e:
                if type(e) is sqlite3.DatabaseError or any(
                    w in str(e).lower() for w in ("full", "readonly", "disk i/o", "decode")
                ):
                    raise store_error(e, directory) from e
                raise

        return sql

    @property
    def _con(self) -> Any:
        """diskcache's connection of this thread, with SQLite's automatic checkpoints off
        (the store's _Checkpointer runs them on a thread of its own) and b-tree pages
        checked as they are read: a damaged page is an error, never a key that seems
        missing (which would run a step, a call or an effect again)."""
        con = diskcache.Cache._con.fget(self)  # type: ignore[attr-defined]
        if getattr(self._local, "nbagent_con", None) is not con:
            con.execute("PRAGMA wal_autocheckpoint = 0")
            con.execute("PRAGMA cell_size_check = ON")
            self._local.nbagent_con = con
        return con

    def get(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get(*args, **kwargs)
        except sqlite3.OperationalError as e:  # raised by fetchall(), after _sql
            if "decode" not in str(e).lower():
                raise
            raise store_error(e, self._directory) from e


TRACE_COLUMNS: tuple[str, ...] = (
    "ts",
    "run",
    "step",
    "kind",
    "name",
    "attempt",
    "status",
    "error",
    "wait_s",
    "model",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    "latency_s",
    "idempotency_key",
    "replayed",
    "price_known",
    "request",
    "response",
    "detail",
)

_TRACE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS trace (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL, run TEXT NOT NULL, step TEXT, kind TEXT NOT NULL, name TEXT,
    attempt INTEGER, status TEXT, error TEXT, wait_s REAL, model TEXT,
    input_tokens INTEGER, cached_tokens INTEGER, output_tokens INTEGER,
    reasoning_tokens INTEGER, cost_usd REAL, latency_s REAL, idempotency_key TEXT,
    replayed INTEGER, price_known INTEGER, request TEXT, response TEXT, detail TEXT
)""",
    "CREATE INDEX IF NOT EXISTS trace_run ON trace (run, seq)",
)
_OLD_TRACE = "trace.sqlite3"  # format 1's trace database


def _json_function() -> Any:
    """``json.dumps(value, default=str)`` for the records nbagent builds (never circular).

    ``JSONEncoder.encode`` builds a C encoder (and a closure) at every call; a step
    commit encodes two small documents, and building was a third of the cost. The C
    encoder of the ``json`` module (``c_make_encoder``, the one ``encode`` builds) is
    made once here, without the circular-reference check; where it is missing or
    takes other arguments, the plain encoder is used. Written by hand: 15 lines.
    """
    plain = json.JSONEncoder(default=str).encode
    try:
        make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
        once = make(
            None, str, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
        )
        probe = {"a": [1, 2.5, None, True, "é"], "b": {"c": float("nan")}, "d": object}
        if "".join(once(probe, 0)) == plain(probe):
            return lambda value: "".join(once(value, 0))
    except (AttributeError, TypeError):
        pass
    return plain


#: ``json.dumps(value, default=str)``
_to_json = _json_function()


_TRACE_COLUMN_SET = frozenset(TRACE_COLUMNS)


def trace_values(row: dict[str, Any]) -> list[Any]:
    """The TRACE_COLUMNS values of a trace row (unknown keys go to the JSON ``detail``)."""
    values = [row.get(c) for c in TRACE_COLUMNS]
    extra = {k: v for k, v in row.items() if k not in _TRACE_COLUMN_SET}
    if extra:
        detail = row.get("detail") or {}
        values[-1] = {**(detail if isinstance(detail, dict) else {"detail": detail}), **extra}
    for i in (-3, -2, -1):  # request, response, detail
        if values[i] is not None and not isinstance(values[i], str):
            values[i] = json.dumps(values[i], default=str)
    if values[0] is None:
        values[0] = time.time()
    return values


def _trace_insert(row: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """The INSERT of a trace row naming only its columns that have a value (a step's row
    has 9 of the 22), and its arguments."""
    values = trace_values(row)
    present = tuple(i for i, v in enumerate(values) if v is not None)
    return _insert_trace(present), tuple(values[i] for i in present)


@functools.lru_cache(maxsize=128)
def _insert_trace(present: tuple[int, ...]) -> str:
    cols = [TRACE_COLUMNS[i] for i in present]
    return f"INSERT INTO trace ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"


def default_store_dir() -> Path:
    """``$NBAGENT_DIR`` if set, else ``.nbagent/`` in the working directory.

    A notebook's kernel starts in the notebook's folder, so this is the
    folder beside the notebook.
    """
    env = os.environ.get("NBAGENT_DIR")
    return Path(env).expanduser() if env else Path.cwd() / ".nbagent"


def _key_dir() -> Path:
    env = os.environ.get("NBAGENT_KEY_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "nbagent" / "keys"


def _process_start(pid: int) -> str | None:
    """Start time of a process (Linux), to tell a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes: assume alive
    pid = int(owner.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = owner.get("pstart")
    return started is None or started == _process_start(pid)


_ME: dict[str, Any] = {}


def _me() -> dict[str, Any]:
    """This process as a lock owner (cached; recomputed after a fork)."""
    if _ME.get("pid") != os.getpid():
        _ME.update(pid=os.getpid(), host=socket.gethostname(), pstart=_process_start(os.getpid()))
    return dict(_ME)


#: One descriptor per lock file per process, never closed: closing any descriptor of a
#: file drops every POSIX lock the process holds on it, whichever Store took them.
_lock_fds: dict[str, int] = {}
_lock_fds_mutex = threading.Lock()

# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding)
_FLOCK = struct.Struct("hhqqi4x")


@functools.lru_cache(maxsize=4096)
def _lock_offset(run: str, step_id: str) -> int:
    """The byte of the lock file that stands for a step: 62 bits of its SHA-1."""
    digest = hashlib.sha1(f"{run}/{step_id}".encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def _lock_holder(fd: int, offset: int) -> int | None:
    """Pid of the process holding a byte of the lock file (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
        l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except (OSError, struct.error):
        return None
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


#: Kinds of keys that belong to one run: ``KIND/RUN/...``.
_RUN_KINDS = ("ctr", "step", "stepidx", "blob", "lock", "llm", "effect")

#: Value files up to this size are read into memory; larger ones are mapped (measured in a
#: cell: reading wins at 512 KB, mapping at 1 MB; a fresh buffer's page faults cost more
#: than mapping the file's cached pages at once).
_READ_WHOLE = 768 << 10

#: Value blobs up to this size are written inside the commit transaction.
_INLINE_BLOB = 1 << 20

# Every entry but the store's identity (``meta/*``, kept by diskcache so that any nbagent can
# read the format) and large values (files, kept by diskcache) is a row of ``records``:
# step records, small value blobs, counters, run records, ledgers. One B-tree and its key
# index, no triggers and no expiry index: a step commit writes half the pages it wrote in
# diskcache's ``Cache`` table. The rowid is the order of first insertion (an upsert keeps it).
_RECORDS_SCHEMA = "CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY NOT NULL, value)"
_GET = "SELECT value FROM records WHERE key = ?"
_ADD = "INSERT INTO records (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING RETURNING 1"
_DELETE = "DELETE FROM records WHERE key = ?"
_DELETE_RANGE = "DELETE FROM records WHERE key >= ? AND key < ?"
_RANGE_KEYS = "SELECT key FROM records WHERE key >= ? AND key < ? ORDER BY rowid"
_PENDING = "SELECT key, value FROM records WHERE key >= ? AND key < ? ORDER BY rowid"
_STEP_VALUES = "SELECT key, value FROM records WHERE key = ? OR (key >= ? AND key < ?)"
_ANY_PENDING = "SELECT 1 FROM records WHERE key >= 'pend/' AND key < 'pend0' LIMIT 1"

#: a process moves its ``pend/`` records (see Store.commit_step) at least every this many
_PENDING_BATCH = 64


def _pending_keys() -> Any:
    """Keys of ``pend/`` records: unique to this Store object and process, in order.
    (A map over a count, all in C: threads may take keys at once, which a generator
    refuses with "generator already executing".)"""
    prefix = f"pend/{uuid.uuid4().hex[:16]}."
    return map((prefix + "{:012d}").format, itertools.count())


#: a value kept by diskcache (a file, or anything of format 3 and older)
_SELECT_FILE = "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1"


@functools.lru_cache(maxsize=16)
def _get_many(n: int) -> str:
    return f"SELECT key, value FROM records WHERE key IN ({', '.join('?' * n)})"


@functools.lru_cache(maxsize=64)
def _upsert(n: int, update: str) -> str:
    """INSERT of ``n`` (key, value) rows; an existing key gets ``DO UPDATE SET update``."""
    values = ", ".join(["(?, ?)"] * n)
    return (
        f"INSERT INTO records (key, value) VALUES {values} ON CONFLICT (key) DO UPDATE SET {update}"
    )


def _put_many(n: int) -> str:
    return _upsert(n, "value = excluded.value")


def _incr_many(n: int) -> str:
    """Integer counters: created at their delta, else incremented; a counter that is not an
    integer (damaged) is left as it is and missing from the rows returned."""
    return _upsert(
        n, "value = value + excluded.value WHERE typeof(value) = 'integer' RETURNING key, value"
    )


#: ``Store.add_if``'s ``decide(run record, counts)``: the increments to make, or None
Decide = Callable[[dict[str, Any], dict[str, int]], "dict[str, int] | None"]


class _Waiting:
    """The counter increments of the step log's entries that a process has read (see
    Store.add_if): each entry's end and increments, and their sum, for one generation."""

    __slots__ = ("generation", "read_to", "entries", "total")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.read_to = _LOG_EMPTY
        self.entries: collections.deque[tuple[int, dict[str, int]]] = collections.deque()
        self.total: dict[str, int] = {}

    def add(self, end: int, increments: dict[str, int]) -> None:
        self.entries.append((end, increments))
        self.read_to = end
        for key, delta in increments.items():
            self.total[key] = self.total.get(key, 0) + delta

    def drop_to(self, start: int) -> None:
        """Forget the entries that end by ``start`` (moved into SQLite)."""
        while self.entries and self.entries[0][0] <= start:
            _, increments = self.entries.popleft()
            for key, delta in increments.items():
                self.total[key] -= delta


def _kind_of(item: tuple[str, Any]) -> str:
    """A record's kind: its key up to the first ``/`` (``step``, ``blob``, ``llm``...)."""
    return item[0].partition("/")[0]


def _increments(rows: dict[str, Any]) -> dict[str, int]:
    """The counter increments of step-log rows (keys ``+ctr/...``), by counter key."""
    return {key[1:]: value for key, value in rows.items() if key[0] == "+"}


def _range(prefix: str) -> tuple[str, str]:
    """(low, high) bounds of the keys starting with ``prefix`` (which ends with ``/``)."""
    return prefix, prefix[:-1] + "0"  # "0" sorts right after "/"


#: at most this many rows per multi-row upsert (SQLite allows 32766 parameters)
_UPSERT_BATCH = 500

#: the records row saying how far the step log was moved into SQLite: [generation, end]
_LOG_FOLDED = "log/folded"
#: the log moves into SQLite by the next commit once it holds this many bytes
_LOG_BATCH_BYTES = 1 << 20


class _Checkpointer:
    """SQLite's write-ahead-log checkpoints for one store, on a thread of their own.

    SQLite checkpoints inside whichever commit finds the log past 1,000 pages:
    copying the log into the database and syncing it takes milliseconds, which a
    step or an LLM call would pay (a step's commit writes ~4 pages). nbagent's
    connections turn that off (``_Cache._con``) and this thread checkpoints
    instead, after every 64 commits of this process and once a second while the
    log changes, as commits go on (SQLite lets writers append meanwhile). The
    thread starts with a commit and ends after 5 idle seconds (a forked child
    starts its own). A failed checkpoint is left for the next one; SQLite also
    checkpoints when a process closes its last connection.
    """

    EVERY = 64
    IDLE_S = 5

    def __init__(self, store: Store) -> None:
        self.store = store
        self.wal = store.path / "cache.db-wal"
        self.wake = threading.Event()
        self.commits = 0
        self.stopped = False
        self.thread: threading.Thread | None = None

    def committed(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="nbagent-checkpoint", daemon=True)
            self.thread.start()
        self.commits += 1
        if self.commits >= self.EVERY:
            self.commits = 0
            self.wake.set()

    def _run(self) -> None:
        seen: Any = None
        idle = 0
        while not self.stopped and idle < self.IDLE_S:
            idle = 0 if self.wake.wait(1.0) else idle + 1
            self.wake.clear()
            if self.stopped:
                return
            try:
                st = os.stat(self.wal)
                if (st.st_size, st.st_mtime_ns) != seen:
                    idle = 0
                    self.store._kv._con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    st = os.stat(self.wal)
                    seen = (st.st_size, st.st_mtime_ns)
            except Exception:  # noqa: BLE001 - no log yet, a full disk, a closed store
                pass

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()


class _Versions:
    """Change counters of the runs' step and run records, shared by the processes on a store.

    ``STORE/cache.db-versions`` is 4 KB mapped into every process that opens the
    store: 512 counters, a run's is ``crc32(run) % 512`` (runs sharing one only cost
    reads). Whoever writes a run's step or run records adds 1 to its counter inside
    the write transaction, before COMMIT, or after its append to the step log
    (see _steplog); every increment is made holding the step log's lock (a
    transaction's too: SQLite's lock first, then the log's), so none is lost. A
    process that knows a run's records as of counter value V (read while it held
    SQLite's write lock, after moving the step log in) still knows them
    while the counter is V, and ``Store.begin_step`` skips its read. A writer killed
    before its COMMIT leaves an increment without a change: readers just read again.
    Without the file (a read-only folder, a file system without shared maps) every
    step begins with a read, as before. Written by hand: 40 lines of ``mmap``.
    """

    SLOTS = 512

    def __init__(self, path: Path) -> None:
        self.counters: memoryview | None = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size < 8 * self.SLOTS:
                    os.ftruncate(fd, 8 * self.SLOTS)  # zeros; never shrinks a used file
                self._map = mmap.mmap(fd, 8 * self.SLOTS)
            finally:
                os.close(fd)
            self.counters = memoryview(self._map).cast("Q")
        except (OSError, ValueError):
            pass

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def slot(run: str) -> int:
        return zlib.crc32(run.encode()) % _Versions.SLOTS

    def get(self, run: str) -> int | None:
        return None if self.counters is None else self.counters[self.slot(run)]

    def bump(self, run: str) -> int | None:
        """Count a change (in a write transaction); the counter's value before it."""
        if self.counters is None:
            return None
        i = self.slot(run)
        before = self.counters[i]
        self.counters[i] = (before + 1) & 0xFFFF_FFFF_FFFF_FFFF
        return before

    def close(self) -> None:
        if self.counters is not None:
            self.counters.release()
            self.counters = None
            self._map.close()


class _Known:
    """A run's step ids and run record as this process knows them, exact while the run's
    versions counter is ``version`` (see _Versions). ``version`` is set last.

    ``rows``: the record (JSON) and small values of steps this process committed, so
    that running such a cell again replays it without a read (within _ROWS_BUDGET).
    """

    __slots__ = ("steps", "record", "version", "rows", "size")

    def __init__(self, steps: set[str], record: dict[str, Any] | None, version: int) -> None:
        self.steps, self.record, self.version = steps, record, version
        self.rows: dict[str, tuple[str, dict[str, bytes]]] = {}
        self.size = 0

    def keep(self, step_id: str, rows: tuple[str, dict[str, bytes]] | None) -> None:
        self.drop(step_id)
        if rows is not None and self.size + _size(rows) <= _ROWS_BUDGET:
            self.rows[step_id] = rows
            self.size += _size(rows)

    def drop(self, step_id: str) -> None:
        old = self.rows.pop(step_id, None)
        if old is not None:
            self.size -= _size(old)


def _size(rows: tuple[str, dict[str, bytes]]) -> int:
    return len(rows[0]) + sum(len(v) for v in rows[1].values())


#: bytes of step rows a process keeps per run to replay its own steps without a read
_ROWS_BUDGET = 8 << 20


class _Transaction:
    """``Store.transaction()``: what ``diskcache.Cache.transact(retry=True)`` does, lighter.

    A step commit is a short transaction; diskcache's three generator context
    managers cost more than its SQL statements on that path. Like diskcache it
    records the owning thread in ``Cache._txn_id``, so diskcache calls inside
    (a value written to a file) join this transaction instead of beginning one,
    and it retries BEGIN while another process holds the write lock. A read-only
    or full store is a StoreError at once (diskcache would retry for ever).
    """

    __slots__ = ("store", "began")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.began = False

    def __enter__(self) -> None:
        kv, tid = self.store._kv, threading.get_ident()
        if kv._txn_id == tid:
            return  # nested: the outer one commits
        while True:
            try:
                self.store._exec("BEGIN IMMEDIATE", ())
                break
            except sqlite3.OperationalError as e:  # busy past the timeout: another writer
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
        kv._txn_id = tid
        self.began = True
        log = self.store._log
        if log is not None and log.pending():
            try:  # steps committed to the log come first (see _steplog)
                self.store._fold()
            except BaseException:
                self.__exit__(*sys.exc_info())
                raise

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if not self.began:
            return
        store = self.store
        store._kv._txn_id = None
        changes, store._changes = store._changes, []
        folded, store._folded = store._folded, None
        if et is None:
            try:
                store._exec("COMMIT", ())
            except BaseException:  # e.g. a full disk: nothing of it is kept
                with contextlib.suppress(sqlite3.Error, StoreError):
                    store._exec("ROLLBACK", ())
                store._forget(changes)
                raise
            store._checkpointer.committed()
            store._apply(changes)
            if folded is not None and store._log is not None:
                store._log.restart(*folded)
            return
        with contextlib.suppress(sqlite3.Error, StoreError):
            store._exec("ROLLBACK", ())
        store._forget(changes)


class Store:
    """One nbagent store directory. Safe to share between processes.

    :param directory: folder of the store; created (mode 0700) if missing.
    """

    _log: StepLog | None = None  # see _steplog (None: steps commit to SQLite)
    _logged = 0  # entries this object appended to the log since it last moved it
    _folded: tuple[int, int] | None = None  # (generation, end) the transaction moved
    _mine: set[str] | None = None  # keys of the log's entries when all are this object's
    _mine_at: tuple[int, int] = (0, 0)  # the log's (generation, end) after its last append
    _waiting: _Waiting | None = None  # see _waiting_increments
    _run_memo: tuple[Any, dict[str, Any]] = (None, {})  # see _run_state_of

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory).expanduser().resolve()
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create the nbagent store at {self.path} ({e.strerror}). "
                "Point nbagent at a writable folder with --store DIR or NBAGENT_DIR."
            ) from e
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreError(
                f"the nbagent store at {self.path} is not writable. "
                "Point nbagent at a writable folder with --store DIR or NBAGENT_DIR."
            )
        try:
            self._kv = _Cache(
                str(self.path), eviction_policy="none", size_limit=2**62, disk=_NoPickleDisk
            )
        except (sqlite3.DatabaseError, UnicodeDecodeError, ValueError, AttributeError) as e:
            # (diskcache raises ValueError or AttributeError on a damaged Settings table)
            raise StoreError(
                f"the nbagent store at {self.path} is damaged or not a store ({e}). "
                "Move it aside and start again with a fresh --store folder."
            ) from e
        self._checkpointer = _Checkpointer(self)
        self._versions = _Versions(self.path / "cache.db-versions")
        self._known: dict[str, _Known] = {}  # by run; see begin_step
        self._syncs: dict[str, int] = {}  # times a run's _Known was read whole
        #: the record changes of the write transaction in progress: (run, counter before, what)
        self._changes: list[tuple[str, int | None, str, Any]] = []
        #: ``pend/`` records this object wrote and did not move yet (see commit_step)
        self._own_pending = 0
        self._pending_keys = _pending_keys()
        self._tls = threading.local()  # this thread's connection (see _rows)
        _all_stores.add(self)
        self._check_format()
        self.id: str = self._kv.get("meta/id") or ""
        if not self.id:
            self._kv.add("meta/id", uuid.uuid4().hex)
            self.id = self._kv.get("meta/id")
        self._key = self._signing_key()
        self._min_file_size: int = self._kv._disk.min_file_size
        if self._versions.counters is not None:  # the log's readers rely on the counters
            try:
                self._log = StepLog(self.path / "cache.db-steplog")
            except (OSError, ValueError):
                self._log = None  # e.g. no shared maps: steps commit to SQLite, as before
        if self._log is None and waiting_in_log(self.path / "cache.db-steplog"):
            raise StoreError(
                f"the nbagent store at {self.path} has steps waiting in its step log "
                "(cache.db-steplog), which this process cannot read: it cannot map files there. "
                "Open the store from a process that can (the one that wrote them moves them in "
                "when it closes), or use a store folder on a local disk."
            )
        # named like diskcache's own files, so Cache.check() neither reports nor deletes it
        self._lock_file = str(self.path / "cache.db-locks")
        #: trace rows written later (``add_trace(defer=True)``: replays), in order
        self._deferred: list[dict[str, Any]] = []
        self._deferred_lock = threading.Lock()

    # -- private plumbing ---------------------------------------------------

    def _check_format(self) -> None:
        found = self._kv.get("meta/format")
        if found is None:
            self._kv.add("meta/format", FORMAT_VERSION)
            found = self._kv.get("meta/format")
        if not isinstance(found, int) or found > FORMAT_VERSION:
            raise StoreFormatError(
                f"the nbagent store at {self.path} has format {found!r}, but this nbagent "
                f"reads format {FORMAT_VERSION} or older. Upgrade nbagent "
                "(pip install -U nbagent) or use another --store folder; nothing was changed."
            )
        for statement in (*_TRACE_SCHEMA, _RECORDS_SCHEMA):
            self._kv._sql(statement)
        if found < FORMAT_VERSION:
            self._upgrade()
        else:
            self._remove_old_trace()  # left by an upgrade killed after its commit

    def _upgrade(self) -> None:
        """Bring a store of an older format to this one (once; safe to race and to kill).

        All in one transaction that also raises the version (an older nbagent refuses
        the upgraded store):

        5 -> 6: nothing moves (steps may wait in ``cache.db-steplog`` from now on, which
        older nbagent would not read).
        4 -> 5: nothing moves (writers count their changes in ``cache.db-versions``
        from now on, and steps may leave ``pend/`` records; the format keeps older
        nbagent, which does neither, from writing).
        3 -> 4: every entry of diskcache's ``Cache`` but ``meta/*`` and the value
        files moves to ``records``, in rowid order (so steps keep their order); the
        trace table is rebuilt without AUTOINCREMENT (same rows, same ``seq``).
        2 -> 3: nothing moves (older blobs stay as they are, and are read).
        1 -> 2: the rows of ``trace.sqlite3`` are copied (with their ``seq``) into
        the trace table of ``cache.db``; then the old file is deleted. Format 1's
        step index and lock rows are left (ignored; ``drop_run`` deletes them).
        """
        old = self.path / _OLD_TRACE
        attached = False
        if old.exists():
            self._kv._sql("ATTACH DATABASE ? AS old_trace", (str(old),))
            attached = True
        moved_files: list[str] = []
        try:
            with self.transaction():
                if (self._kv.get("meta/format") or 0) < FORMAT_VERSION:
                    if (
                        attached
                        and self._kv._sql(
                            "SELECT 1 FROM old_trace.sqlite_master WHERE name = 'trace'"
                        ).fetchall()
                    ):
                        cols = ", ".join(("seq", *TRACE_COLUMNS))
                        self._kv._sql(
                            f"INSERT INTO main.trace ({cols}) SELECT {cols} FROM old_trace.trace "
                            "WHERE seq > (SELECT coalesce(max(seq), 0) FROM main.trace) "
                            "ORDER BY seq"
                        )
                    moved_files = self._move_to_records()
                    self._rebuild_trace()
                    self._kv.set("meta/format", FORMAT_VERSION)
        finally:
            if attached:
                self._kv._sql("DETACH DATABASE old_trace")
        for filename in moved_files:  # after the commit: a rolled back move loses nothing
            self._kv._disk.remove(filename)
        self._remove_old_trace()

    def _move_to_records(self) -> list[str]:
        """Format 3 -> 4: diskcache's entries into ``records``; returns the files to delete."""
        files = []
        entries = self._rows(
            "SELECT rowid, key, mode, filename, value FROM Cache "
            "WHERE raw = 1 AND substr(key, 1, 5) != 'meta/' ORDER BY rowid",
            (),
        )
        for rowid, key, mode, filename, value in entries:
            if filename is not None:
                if key.startswith("blob/"):
                    continue  # a large value: it stays a file
                value = self._kv.get(key)  # a large text (a record) kept in a file
                files.append(filename)
            elif mode != diskcache.core.MODE_RAW:
                continue  # not an entry nbagent wrote (a pickle): left alone, never read
            self._rows(_put_many(1), (key, value))
            self._rows("DELETE FROM Cache WHERE rowid = ?", (rowid,))
        return files

    def _rebuild_trace(self) -> None:
        """The trace table without AUTOINCREMENT (its bookkeeping is one more page per row)."""
        found = self._rows(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'trace'", ()
        )
        if not found or "AUTOINCREMENT" not in str(found[0][0]).upper():
            return
        cols = ", ".join(("seq", *TRACE_COLUMNS))
        self._rows(_TRACE_SCHEMA[0].replace(" trace (", " trace_new (", 1), ())
        self._rows(f"INSERT INTO trace_new ({cols}) SELECT {cols} FROM trace ORDER BY seq", ())
        self._rows("DROP TABLE trace", ())
        self._rows("ALTER TABLE trace_new RENAME TO trace", ())
        self._rows(_TRACE_SCHEMA[1], ())

    def _remove_old_trace(self) -> None:
        if (self.path / _OLD_TRACE).exists():
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / f"{_OLD_TRACE}{suffix}").unlink()

    def _signing_key(self) -> bytes:
        folder = _key_dir()
        path = folder / f"{self.id}.key"
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = folder / f".{self.id}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # first writer wins; others read its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return path.read_bytes()

    @property
    def _trace(self) -> sqlite3.Connection:
        """The connection (this thread's) to the database holding the trace table."""
        return self._kv._con  # type: ignore[no-any-return]

    # Records are read and written with one SQL statement each (see _RECORDS_SCHEMA).

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        """Run one statement and fetch its rows (steps waiting in the step log are moved
        into SQLite first, so that no read misses them); see _exec."""
        log = self._log
        if (
            log is not None
            and log.head[2] != _LOG_EMPTY
            and self._kv._txn_id != threading.get_ident()
        ):
            with self.transaction():  # it moves them (a transaction moves them first)
                pass
        return self._exec(sql, args)

    def _exec(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        """Run one statement and fetch its rows; disk and damage failures are StoreErrors.

        The connection is diskcache's for this thread, kept here: diskcache's
        ``_con`` asks the OS for the process id on every statement (to notice a
        fork), six system calls per step; a fork clears this (_forget_connections).
        """
        try:
            con = self._tls.con
        except AttributeError:
            con = self._tls.con = self._kv._con
        try:
            return con.execute(sql, args).fetchall()  # type: ignore[no-any-return]
        except sqlite3.DatabaseError as e:  # as _Cache._sql (fetchall() can raise them too)
            low = str(e).lower()  # e.g. "Could not decode to UTF-8", "database or disk is full"
            if type(e) is sqlite3.DatabaseError or any(
                w in low for w in ("decode", "full", "readonly", "disk i/o")
            ):
                raise store_error(e, self.path) from e
            raise

    def _raw_many(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """:meth:`_raw` of several keys with one SELECT (missing keys are left out)."""
        return dict(self._rows(_get_many(len(keys)), keys))

    def _raw(self, key: str) -> Any:
        if self._only_mine(key):  # what waits in the log is this object's, and not this key
            rows = self._exec(_GET, (key,))
        else:
            rows = self._rows(_GET, (key,))
        return rows[0][0] if rows else None

    def _put(self, key: str, value: str | bytes | int) -> None:
        self._rows(_put_many(1), (key, value))

    def _put_many(self, items: dict[str, str | bytes]) -> None:
        """:meth:`_put` of several values with one statement per 500."""
        pairs = list(items.items())
        for i in range(0, len(pairs), _UPSERT_BATCH):
            batch = pairs[i : i + _UPSERT_BATCH]
            self._rows(_put_many(len(batch)), tuple(x for pair in batch for x in pair))

    def _parse_json(self, key: str, raw: Any) -> Any:
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (ValueError, TypeError) as e:
            raise StoreError(
                f"the entry {key!r} in the nbagent store at {self.path} is damaged ({e}); it was "
                "not used. Reset that step (`%nbagent reset STEP`, run.reset([...])), or move the "
                "store aside and start again with a fresh --store folder."
            ) from e

    def _get_json(self, key: str) -> Any:
        return self._parse_json(key, self._raw(key))

    def _set_json(self, key: str, value: Any) -> None:
        self._put(key, _to_json(value))

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One atomic read-modify-write across processes (SQLite BEGIN IMMEDIATE).

        Nests, in this thread, with itself and with diskcache's own transactions.
        It moves the step log into SQLite first.
        """
        return _Transaction(self)

    def add_if(self, run: str, counters: tuple[str, ...], decide: Decide) -> dict[str, int] | None:
        """Read the run record and ``counters``, and add to counters what
        ``decide(record, counts)`` returns (None: nothing), atomically across processes;
        the ``counters`` after it, or None. (An LLM call's reservation against the caps.)

        With a step log this holds its lock, which every appender takes: the counts are
        SQLite's plus the increments of the log's entries not moved yet (where the moves
        got to, ``log/folded``, is read in the same SELECT), and the increments become
        one entry of the log, with no SQLite transaction. Otherwise one transaction.
        """
        log = self._log
        if log is None or not self._may_log():
            return self._add_in_transaction(run, counters, decide)
        with log.locked():
            keys = (f"run/{run}", *(f"ctr/{run}/{n}" for n in counters), _LOG_FOLDED)
            found = dict(self._exec(_get_many(len(keys)), keys))  # one snapshot, no move
            record, counts = self._run_state_of(run, counters, found, memo=True)
            start = log.start_after(
                self._parse_json(_LOG_FOLDED, found.get(_LOG_FOLDED)), log.head[1]
            )
            waiting = self._waiting_increments(start)
            counts = {n: v + waiting.get(f"ctr/{run}/{n}", 0) for n, v in counts.items()}
            deltas = decide(record, counts)
            if deltas is not None:
                self._append_locked({f"+ctr/{run}/{n}": d for n, d in deltas.items()})
        if deltas is None:
            return None
        return {n: counts[n] + deltas.get(n, 0) for n in counters}

    def _add_in_transaction(
        self, run: str, counters: tuple[str, ...], decide: Decide
    ) -> dict[str, int] | None:
        """:meth:`add_if` as one transaction."""
        with self.transaction():
            record, counts = self.run_state(run, counters)
            deltas = decide(record, counts)
            if deltas is None:
                return None
            self.incr_many(run, deltas)
        return {n: counts[n] + deltas.get(n, 0) for n in counters}

    def _waiting_increments(self, start: int) -> dict[str, int]:
        """Holding the log's lock: the counter increments of its entries after ``start``.
        Entries are read once per process (see _Waiting); this process's own appends are
        added as they are made."""
        log = self._log
        assert log is not None
        generation, end = log.head[1], log.head[2]
        waiting = self._waiting
        if waiting is None or waiting.generation != generation:
            waiting = self._waiting = _Waiting(generation)
        if waiting.read_to < end:
            found, _ = log.entries(waiting.read_to, end)  # (a fold warns of damage)
            for entry_end, rows in found:
                waiting.add(entry_end, _increments(rows))
            waiting.read_to = end
        waiting.drop_to(start)
        return waiting.total

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Writes that read nothing back, committed together (all or none) at the end.

        :meth:`set_record`, :meth:`incr_blind` and :meth:`add_trace` made in this
        thread inside it are collected and written as one step-log entry when the
        store has a log (an LLM call's settlement, ledger record and trace row: no
        SQLite transaction on the call's path), else in one transaction. Other writes
        inside it go to SQLite at once. An inner batch joins the outer one; an
        exception inside discards the batch.
        """
        if getattr(self._tls, "batch", None) is not None:
            yield
            return
        rows: dict[str, Any] = {}
        self._tls.batch = rows
        try:
            yield
        finally:
            self._tls.batch = None
        if rows:
            self._write_batch(rows)

    def _write_batch(self, rows: dict[str, Any]) -> None:
        traced = sum(1 for k in rows if k.startswith("pend/"))
        if self._may_log():
            self._append(rows)
        else:
            with self.transaction():
                if self._deferred or self._own_pending >= _PENDING_BATCH:
                    self._flush_trace()  # replays' rows come before these
                self._put_rows(rows)
        if traced:
            self._own_pending += traced
            _deferring.add(self)  # moved at exit, if nothing moves it before

    # -- blobs (signed pickles) ---------------------------------------------

    # -- what this process knows of a run's records (see _Versions) ---------

    def _changed(self, run: str, what: str, value: Any = None) -> None:
        """In a write transaction: the run's step or run records change. ``what``:
        ``step+`` (a step committed: its id and rows, see _Known), ``step-`` (a step id
        dropped), ``record`` (the run record now), ``drop`` (the whole run). Applied to
        ``_known`` when the transaction commits."""
        # the log's appenders count changes too, without SQLite's lock
        with self._log.locked() if self._log is not None else contextlib.nullcontext():
            self._changes.append((run, self._versions.bump(run), what, value))

    def _may_log(self) -> bool:
        """Whether the next commit may be an append to the step log: there is one, neither
        it nor what waits for the trace is due to move (see commit_step), and this thread
        is not in a transaction (whose rollback must take the commit back too)."""
        log = self._log
        return (
            log is not None
            and not self._deferred
            and self._own_pending < _PENDING_BATCH
            and self._logged < _PENDING_BATCH
            and log.head[2] < _LOG_BATCH_BYTES
            and self._kv._txn_id != threading.get_ident()
        )

    def _append(self, rows: dict[str, Any], run: str | None = None) -> int | None:
        """Append rows to the step log as one entry; with ``run``, count a change of its
        step records (see _Versions) and return the counter before it."""
        log = self._log
        assert log is not None
        before = None
        with log.locked():
            self._append_locked(rows)
            if run is not None:
                before = self._versions.bump(run)
        return before

    def _append_locked(self, rows: dict[str, Any]) -> None:
        """Holding the log's lock: append one entry; keep what this object knows of the log
        (``_mine``, see _only_mine; ``_waiting``, see _waiting_increments)."""
        log = self._log
        assert log is not None
        at = (log.head[1], log.head[2])
        if at[1] == _LOG_EMPTY:
            self._mine = set()  # an empty log: what follows is known here
        elif at != self._mine_at:
            self._mine = None  # another process appended since: unknown
        try:
            log.append(rows)
        except OSError as e:
            raise store_error(e, self.path) from e
        if self._mine is not None:
            self._mine.update(rows)
        self._mine_at = (log.head[1], log.head[2])
        waiting = self._waiting
        if waiting is not None and (waiting.generation, waiting.read_to) == at:
            waiting.add(self._mine_at[1], _increments(rows))  # known without reading it back
        self._logged += 1
        _deferring.add(self)  # the log moves into SQLite at exit, if nothing moves it before

    def _only_mine(self, key: str, prefix: bool = False) -> bool:
        """Whether the step log holds entries of this object only, none of them for ``key``
        (with ``prefix``: for a key starting with it); then a read need not move the log
        first (see _raw). Never for a counter: the log's increments and ``pend/`` rows
        add to counters."""
        log = self._log
        mine = self._mine
        return (
            log is not None
            and mine is not None
            and not key.startswith("ctr/")
            and (not any(k.startswith(key) for k in mine) if prefix else key not in mine)
            and (log.head[1], log.head[2]) == self._mine_at
        )

    def _put_rows(self, rows: dict[str, Any]) -> None:
        """In a write transaction: rows of the step log or of a batch; a key starting with
        ``+`` adds its value to the counter named by the rest of the key."""
        increments = {k[1:]: v for k, v in rows.items() if k[0] == "+"}
        if increments:
            rows = {k: v for k, v in rows.items() if k[0] != "+"}
        if rows:
            # one kind of record after the other, each in commit order (step_ids and the
            # pend/ moves read rowid order): alternating kinds (a ledger record, a pend/ row,
            # the next ledger record...) split B-tree pages half-full, 1.9x the pages
            self._put_many(dict(sorted(rows.items(), key=_kind_of)))
        if increments:
            self._incr_keys(increments)

    def _fold(self) -> None:
        """In a write transaction: move the step log's entries into SQLite (see _steplog).

        Where the moves got to is a record of the same transaction (``log/folded``), so a
        process killed after this COMMIT and before the log restarts moves nothing twice.
        """
        assert self._log is not None
        done = self._parse_json(_LOG_FOLDED, self._raw(_LOG_FOLDED))
        generation, end, entries, damaged = self._log.read(done)
        if damaged:
            warnings.warn(
                f"nbagent: the step log of the store at {self.path} has a damaged entry (after "
                "a power loss or a disk error?); steps committed from it on will run again.",
                RuntimeWarning,
                stacklevel=2,
            )
        rows: dict[str, Any] = {}
        for entry in entries:  # in commit order; a step committed twice keeps its last rows
            for key, value in entry.items():
                rows[key] = rows.get(key, 0) + value if key[0] == "+" else value
        self._put_rows(rows)
        self._exec(_put_many(1), (_LOG_FOLDED, _to_json([generation, end])))
        self._folded = (generation, end)
        self._logged = 0
        self._mine = None

    def _apply(self, changes: list[tuple[str, int | None, str, Any]]) -> None:
        for run, before, what, value in changes:
            known = self._known.get(run)
            if known is None:
                continue
            if before is None or known.version != before or what == "drop":
                del self._known[run]  # somebody else changed the run meanwhile: read it again
                continue
            if what == "step+":
                step_id, rows = value
                known.steps.add(step_id)
                known.keep(step_id, rows)
            elif what == "step-":
                known.steps.discard(value)
                known.drop(value)
            else:
                known.record = value
            known.version = (before + 1) & 0xFFFF_FFFF_FFFF_FFFF

    def _forget(self, changes: list[tuple[str, int | None, str, Any]]) -> None:
        for run, *_ in changes:
            self._known.pop(run, None)

    def _know(self, run: str) -> _Known | None:
        """Read the run's step ids and record while holding the write lock (so every
        counted change is committed); at most three times per run and process (another
        process writing the same run makes this process read at each step, as before)."""
        if self._versions.counters is None or self._syncs.get(run, 0) >= 3:
            return None
        self._syncs[run] = self._syncs.get(run, 0) + 1
        with self.transaction():
            self._learn(run)
        return self._known.get(run)

    def _learn(self, run: str) -> None:
        """In a write transaction: know the run as it is now (made in put_run too, so a
        new run is known from the start, at the cost of one empty range query)."""
        version = self._versions.get(run)
        if version is not None:
            if self._log is not None and self._log.pending():
                self._fold()  # steps logged before the counter was read are in what is read
            self._known[run] = _Known(set(self.step_ids(run)), self.get_run(run), version)

    def _mac(self, payload: bytes | memoryview) -> bytes:
        """Keyed BLAKE3 of a payload: a MAC, at several GB/s (multi-threaded when large)."""
        threads = blake3.blake3.AUTO if len(payload) >= 1 << 22 else 1
        key = self._key if len(self._key) == 32 else hashlib.sha256(self._key).digest()
        return blake3.blake3(payload, key=key, max_threads=threads).digest()

    def _old_mac(self, payload: bytes | memoryview) -> bytes:
        """HMAC-SHA256, the signature of format 2's blobs."""
        return hmac.digest(self._key, payload, "sha256")

    def sign(self, payload: bytes) -> bytes:
        return b"".join(
            (_BLOB_MAGIC, bytes(_BLOB_HEAD - 4 - _SIG_LEN), self._mac(payload), payload)
        )

    def verify(self, blob: Any) -> bytes | memoryview | None:
        """The payload of a signed blob, or None when it was not signed by this store's key.

        A large payload comes back as a view of ``blob`` (no copy; writable when
        ``blob`` is, like a copy-on-write mapping).
        """
        if not isinstance(blob, bytes | bytearray | mmap.mmap):
            return None
        view = memoryview(blob)
        magic = view[:4]
        if magic == _BLOB_MAGIC:
            head, mac = _BLOB_HEAD, self._mac
        elif magic == _OLD_BLOB_MAGIC:
            head, mac = 4 + _SIG_LEN, self._old_mac
        else:
            return None
        payload = view[head:]
        if not hmac.compare_digest(view[head - _SIG_LEN : head], mac(payload)):
            return None
        return bytes(payload) if type(blob) is bytes and len(payload) < 1 << 20 else payload

    def put_blob(self, key: str, payload: bytes) -> None:
        self._put_signed(f"blob/{key}", self.sign(payload))

    def _put_signed(self, key: str, blob: bytes) -> None:
        """A signed value: a record when small, else a file of diskcache's.

        A record takes precedence over a file of the same key (see get_blob), so
        writing a file deletes the record, in one transaction.
        """
        if len(blob) < self._min_file_size:
            self._put(key, blob)
            return
        with self.transaction():
            self._kv.set(key, blob, retry=True)
            self._rows(_DELETE, (key,))

    def get_step_values(
        self, run: str, step_id: str
    ) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
        """The step's record and its small values (signed blobs, by name) with one SELECT:
        a replay reads nothing else unless a value is large (a file). Check a value with
        :meth:`verify_blob` before use."""
        prefix = f"blob/{run}/{step_id}/"
        key = f"step/{run}/{step_id}"
        known = self._known.get(run)
        if known is not None and known.version == self._versions.get(run):
            kept = known.rows.get(step_id)  # committed by this process, unchanged since
            if kept is not None:
                return self._as_dict(key, self._parse_json(key, kept[0])), dict(kept[1])
        found = dict(self._rows(_STEP_VALUES, (key, *_range(prefix))))
        record = self._as_dict(key, self._parse_json(key, found.pop(key, None)))
        return record, {k[len(prefix) :]: v for k, v in found.items()}

    def get_blob(self, key: str) -> bytes | memoryview | None:
        """Verified payload; None if missing. Raises StoreError if tampered.

        A small value is a record; a large one is a file of diskcache's, read
        straight into a bytearray (not through diskcache), so a large payload
        comes back as a writable view of it.
        """
        full = f"blob/{key}"
        raw = self._raw(full)
        if raw is None:
            rows = self._rows(_SELECT_FILE, (full,))
            if not rows:
                return None
            mode, filename, raw = rows[0]
            if filename is not None and mode == diskcache.core.MODE_BINARY:
                raw = self._read_file(filename)
            elif not (mode == diskcache.core.MODE_RAW and filename is None):
                raw = self._kv.get(full)
        return self.verify_blob(key, raw)

    def verify_blob(self, key: str, raw: Any) -> bytes | memoryview:
        """The payload of the value ``key`` (``RUN/STEP/NAME``) kept as ``raw``; a StoreError
        when this store's key did not sign it."""
        payload = self.verify(raw)
        if payload is None:
            raise StoreError(
                f"the stored value 'blob/{key}' in {self.path} is not signed by this store's key "
                "(it was changed by someone else, or the key under ~/.local/share/nbagent/keys "
                "is missing). It was not loaded. Re-run the step with --rerun to store it again."
            )
        return payload

    def _read_file(self, filename: str) -> mmap.mmap | bytearray:
        """A value file of diskcache's, read without diskcache, as a writable buffer.

        Up to 768 KB it is read into a bytearray (one copy: faster than mapping
        pages). A larger one is mapped copy-on-write: nothing is copied, the
        signature is checked on the mapped pages (the kernel maps them all at
        once where it can) and arrays unpickled on them stay writable (a write
        copies just that page, never touching the file). diskcache never
        rewrites a value file in place; it writes new files and deletes old
        ones, which a mapping outlives.
        """
        try:
            with open(os.path.join(self._kv.directory, filename), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size <= _READ_WHOLE:
                    data = bytearray(size)
                    view, got = memoryview(data), 0
                    while got < size and (n := f.readinto(view[got:])):
                        got += n
                    return data if got == size else data[:got]
                return mmap.mmap(
                    f.fileno(),
                    size,
                    flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0),
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                )
        except (OSError, ValueError) as e:
            raise store_error(e, self.path) from e

    def delete_blob(self, key: str) -> None:
        self._rows(_DELETE, (f"blob/{key}",))
        self._kv.delete(f"blob/{key}", retry=True)

    def _delete_files(self, keys: list[str]) -> None:
        """Delete diskcache's entries (value files) of these keys; one SELECT when none exist."""
        for i in range(0, len(keys), _UPSERT_BATCH):
            batch = tuple(keys[i : i + _UPSERT_BATCH])
            sql = f"SELECT key FROM Cache WHERE key IN ({', '.join('?' * len(batch))}) AND raw = 1"
            for (key,) in self._rows(sql, batch):
                self._kv.delete(key, retry=True)

    # -- runs -----------------------------------------------------------------

    def _get_dict(self, key: str) -> dict[str, Any] | None:
        return self._as_dict(key, self._get_json(key))

    def _get_dicts(
        self, key: str, other: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """:meth:`_get_dict` of two keys with one SELECT."""
        raw = self._raw_many((key, other))
        return (
            self._as_dict(key, self._parse_json(key, raw.get(key))),
            self._as_dict(other, self._parse_json(other, raw.get(other))),
        )

    def _as_dict(self, key: str, value: Any) -> dict[str, Any] | None:
        if value is not None and not isinstance(value, dict):
            raise StoreError(
                f"the entry {key!r} in the nbagent store at {self.path} is damaged (not a "
                "record); it was not used. Reset that step (`%nbagent reset STEP`, "
                "run.reset([...])), or move the store aside and start again with a fresh --store."
            )
        return value

    def get_run(self, run: str) -> dict[str, Any] | None:
        return self._get_dict(f"run/{run}")

    def put_run(self, run: str, record: dict[str, Any]) -> None:
        text = _to_json(record)
        with self.transaction():
            self._flush_trace(everyone=True)  # counts in pend/ records, before a cap changes
            if run not in self._known:
                self._learn(run)
            self._put(f"run/{run}", text)
            self._changed(run, "record", json.loads(text))
            names = self._get_json("runs") or []
            if run not in names:
                names.append(run)
                self._set_json("runs", names)

    def runs(self) -> list[str]:
        return list(self._get_json("runs") or [])

    def counter(self, run: str, name: str) -> int:
        if name == "steps":
            self._flush_trace(everyone=True)  # counts waiting in pend/ records
        value = self._raw(f"ctr/{run}/{name}") or 0
        if not isinstance(value, int):
            raise StoreError(
                f"the counter 'ctr/{run}/{name}' in the nbagent store at {self.path} is damaged; "
                "it was not used. Move the store aside and start again with a fresh --store folder."
            )
        return value

    def run_state(
        self, run: str, counters: tuple[str, ...]
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The run's record (``{}`` if missing) and some of its counters, with one SELECT."""
        if "steps" in counters:
            self._flush_trace(everyone=True)  # counts waiting in pend/ records
        keys = [f"run/{run}", *(f"ctr/{run}/{name}" for name in counters)]
        return self._run_state_of(run, counters, self._raw_many(tuple(keys)))

    def _run_state_of(
        self, run: str, counters: tuple[str, ...], found: dict[str, Any], memo: bool = False
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """run_state from the rows of its keys (missing ones left out). ``memo``: the
        record may be the one parsed last time from the same text (the caller only reads
        it; an LLM call's reservation reads the same run record call after call)."""
        key = f"run/{run}"
        raw = found.get(key)
        if memo and raw is not None and raw == self._run_memo[0]:
            record = self._run_memo[1]
        else:
            record = self._as_dict(key, self._parse_json(key, raw)) or {}
            if memo:
                self._run_memo = (raw, record)
        values = {}
        for name in counters:
            key = f"ctr/{run}/{name}"
            value = found.get(key, 0)
            if not isinstance(value, int):
                raise StoreError(
                    f"the counter {key!r} in the nbagent store at {self.path} is damaged; it was "
                    "not used. Move the store aside and start again with a fresh --store folder."
                )
            values[name] = value
        return record, values

    def incr(self, run: str, name: str, delta: int = 1) -> int:
        key = f"ctr/{run}/{name}"
        rows = self._rows(_incr_many(1), (key, delta))
        if not rows:  # the row is not a number nbagent wrote
            raise self._damaged_counter(key)
        return int(rows[0][1])

    def _damaged_counter(self, key: str) -> StoreError:
        return StoreError(
            f"the counter {key!r} in the nbagent store at {self.path} is damaged (not an "
            "integer); it was not used. Move the store aside and start again with a fresh "
            "--store folder."
        )

    def incr_blind(self, run: str, deltas: dict[str, int]) -> None:
        """Add to counters without reading them back; inside :meth:`batch` it joins it."""
        rows = getattr(self._tls, "batch", None)
        if rows is None:
            self.incr_many(run, deltas)
            return
        for name, delta in deltas.items():
            key = f"+ctr/{run}/{name}"  # "+": an increment (see _put_rows)
            rows[key] = rows.get(key, 0) + int(delta)

    def incr_many(self, run: str, deltas: dict[str, int]) -> dict[str, int]:
        """:meth:`incr` of several counters at once (one statement); their new values.

        All or none: a damaged counter raises (the increments are rolled back).
        """
        names = {f"ctr/{run}/{name}": name for name in deltas}
        with self.transaction():
            found = self._incr_keys({key: deltas[name] for key, name in names.items()})
        return {names[key]: value for key, value in found.items()}

    def _incr_keys(self, increments: dict[str, int]) -> dict[str, int]:
        """Add to counters named by their keys (one statement); their new values. A damaged
        counter raises (inside a transaction, which then rolls the others back)."""
        args = tuple(x for key, delta in increments.items() for x in (key, int(delta)))
        found = {key: int(value) for key, value in self._rows(_incr_many(len(increments)), args)}
        damaged = sorted(increments.keys() - found.keys())
        if damaged:
            raise self._damaged_counter(damaged[0])
        return found

    def drop_run(self, run: str) -> int:
        """Delete a run and everything kept for it (steps, values, counters, ledger, trace).

        Returns the number of completed steps dropped. For ``nbagent gc``; the
        run's spend goes with it, so this is never done implicitly.
        """
        self._flush_trace(everyone=True)  # so no pend/ record brings the run back
        steps = len(self.step_ids(run))
        prefixes = tuple(f"{kind}/{run}/" for kind in _RUN_KINDS)
        exact = (f"run/{run}", f"dbos/{run}", f"resv/{run}")
        files = [  # large values
            k
            for k in self._kv.iterkeys()
            if isinstance(k, str) and (k in exact or k.startswith(prefixes))
        ]
        with self.transaction():
            for prefix in prefixes:
                self._rows(_DELETE_RANGE, _range(prefix))
            for key in exact:
                self._rows(_DELETE, (key,))
            for key in files:
                self._kv.delete(key)
            self._set_json("runs", [r for r in self.runs() if r != run])
            self._changed(run, "drop")
        self.delete_trace(run)
        return steps

    # -- steps ----------------------------------------------------------------

    def get_step(self, run: str, step_id: str) -> dict[str, Any] | None:
        return self._get_dict(f"step/{run}/{step_id}")

    def step_ids(self, run: str) -> list[str]:
        """Completed steps of a run, in the order they were first committed.

        One range query over the records' key index on the ``step/RUN/`` keys,
        ordered by rowid: a record is updated in place (its rowid kept) when a
        step is committed again, and gets a new, larger rowid only when it is
        written after being dropped, so rowid order is first-commit order (the
        upgrade to format 4 moved the records in diskcache's rowid order, which
        had the same meaning; format 1 also kept an index, ``stepidx/RUN/N``).
        """
        prefix = f"step/{run}/"
        rows = self._rows(_RANGE_KEYS, _range(prefix))
        return [key[len(prefix) :] for (key,) in rows]

    def commit_step(
        self,
        run: str,
        step_id: str,
        record: dict[str, Any],
        blobs: dict[str, bytes],
        previous: Any = UNREAD,
        trace: dict[str, Any] | None = None,
        count: bool = False,
    ) -> None:
        """Store a finished step atomically, then release its lock.

        The step's rows (record, small values, trace row) are one append to the step
        log (see _steplog) when the store has one and nothing else must be written
        with them (values kept in files, a count without a trace row, an earlier
        record to read, 64 entries or 1 MB already logged): they move into SQLite with
        the next write transaction or read. Otherwise they are one SQLite transaction.

        ``previous`` is the step's record before this execution (None for a new
        step) as the caller read it under the step's lock; by default it is read
        here. ``trace`` is the step's trace row, committed with the record (so a
        committed step always has its trace row): it and the step count wait as one
        ``pend/`` record, a row of the same statement (or entry) as the record (the
        trace table, its index and the counter would be three more B-tree pages and
        two statements per commit). They move to the trace and the counter in batches
        (:meth:`_move_pending`), before this process writes another trace row and
        whenever the trace or the step count is read, so readers never miss them and
        a crash loses nothing. Large value blobs are written first, outside the transaction (so
        other processes are not blocked while a big file is written); a crash
        before the transaction leaves orphan blobs but never a record that points
        at a missing blob. ``count``: also count the step's execution (in the same
        transaction), for a step :meth:`begin_step` did not count.
        """
        rows: dict[str, str | bytes] = {}
        files: dict[str, bytes | None] = {}  # values kept in files (None: written already)
        for name, payload in blobs.items():
            key = f"blob/{run}/{step_id}/{name}"
            if len(payload) > _INLINE_BLOB:
                self._kv.set(key, self.sign(payload), retry=True)
                files[key] = None
            else:
                blob = self.sign(payload)
                if len(blob) < self._min_file_size:
                    rows[key] = blob
                else:
                    files[key] = blob
        rows[f"step/{run}/{step_id}"] = _to_json(record)
        prefix = f"blob/{run}/{step_id}/"
        kept = (
            rows[f"step/{run}/{step_id}"],
            {k[len(prefix) :]: v for k, v in rows.items() if k.startswith(prefix)},
        )
        if trace is not None:  # the trace row and the count wait in the same statement
            values = trace_values(trace)
            row = {c: v for c, v in zip(TRACE_COLUMNS, values, strict=True) if v is not None}
            rows[next(self._pending_keys)] = _to_json([row, run, int(count)])
            count = False
        if not files and not count and previous is not UNREAD and self._may_log():
            # one append to the step log (see _steplog); SQLite gets it in a later batch
            before = self._append(rows, run)
            self._apply([(run, before, "step+", (step_id, kept))])
            old = previous or {}
        else:
            old = self._commit_rows(run, step_id, rows, files, previous, count, kept)
        if trace is not None:
            self._own_pending += 1
            _deferring.add(self)  # moved at exit, if nothing moves it before
        self.release_lock(run, step_id)  # after the commit: the next holder sees the record
        saved_before = old.get("saved", [])
        for name in set(saved_before) - set(blobs):
            self.delete_blob(f"{run}/{step_id}/{name}")
        if saved_before:  # files of older values now kept as records
            self._delete_files([k for k in rows if k.startswith("blob/")])

    def _commit_rows(
        self,
        run: str,
        step_id: str,
        rows: dict[str, str | bytes],
        files: dict[str, bytes | None],
        previous: Any,
        count: bool,
        kept: Any,
    ) -> dict[str, Any]:
        """commit_step's SQLite transaction; returns the step's record before it."""
        with self.transaction():
            old = (self.get_step(run, step_id) if previous is UNREAD else previous) or {}
            if self._deferred or self._own_pending >= _PENDING_BATCH:
                self._flush_trace()  # replays' rows come before this step's
            self._put_many(rows)  # the small values, the record, its pending trace row
            for key, value in files.items():
                if value is not None:
                    self._kv.set(key, value, retry=True)
                self._rows(_DELETE, (key,))  # an older, small value would hide the file
            if count:
                self.incr(run, "steps")
            self._changed(run, "step+", (step_id, kept))
        return old

    def drop_step(self, run: str, step_id: str) -> bool:
        try:
            record = self.get_step(run, step_id)
        except StoreError:  # a damaged record: dropping it is the fix
            record = {"damaged": True}
        with self.transaction():
            self._rows(_DELETE, (f"step/{run}/{step_id}",))
            if record and record.get("ordinal") is not None:  # format 1's index
                self._rows(_DELETE, (f"stepidx/{run}/{record['ordinal']}",))
            self._changed(run, "step-", step_id)
        for name in (record or {}).get("saved", []):
            self.delete_blob(f"{run}/{step_id}/{name}")
        return record is not None

    # -- step locks -----------------------------------------------------------

    def begin_step(
        self, run: str, step_id: str
    ) -> tuple[dict[str, Any] | None, int | None, dict[str, Any], dict[str, Any] | None]:
        """Lock a step and, when the run has a step cap, count its execution.

        Returns (dead owner taken over or None, the run's new step count, the
        run record, the step's record read under the lock) so the caller can
        check the stop switch and the step cap (and undo with :meth:`undo_begin`
        when it refuses), and see whether another process committed the step in
        the meantime. No transaction: the lock is a file lock, the two records
        are read with one SELECT and the count is one atomic SQL statement. The read
        is skipped when nothing of the run changed since this process last read or
        wrote it (its counter in ``cache.db-versions`` says so, see _Versions); the
        process reads the run whole once, with ``_know``, to know that. Without a
        ``max_steps`` cap nothing is written and the count is None: the caller
        counts the execution when it ends (``commit_step(count=True)``, or
        :meth:`incr` for a failed step). With a cap it is counted here, before
        the body runs, so the cap holds across processes and crash loops.
        """
        owner = self.acquire_lock(run, step_id)
        try:
            known = self._known.get(run) or self._know(run)
            if (  # (version first: it is set last, when steps and record are up to date)
                known is not None
                and known.version == self._versions.get(run)
                and step_id not in known.steps
            ):  # nothing of the run changed since this process last read or wrote it
                step, record = None, known.record
            else:
                step, record = self._get_dicts(f"step/{run}/{step_id}", f"run/{run}")
            record = record or {}
            count = None
            if (record.get("caps") or {}).get("steps") is not None:
                count = self.incr(run, "steps")
        except BaseException:
            self.release_lock(run, step_id)
            raise
        return owner, count, record, step

    def undo_begin(self, run: str, step_id: str, counted: bool = True) -> None:
        try:
            if counted:
                self.incr(run, "steps", -1)
        finally:
            self.release_lock(run, step_id)

    def _lock_fd(self) -> int:
        fd = _lock_fds.get(self._lock_file)
        if fd is None:
            with _lock_fds_mutex:
                fd = _lock_fds.get(self._lock_file)
                if fd is None:
                    try:
                        fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    except OSError as e:
                        raise store_error(e, self.path) from e
                    _lock_fds[self._lock_file] = fd
        return fd

    def acquire_lock(self, run: str, step_id: str) -> dict[str, Any] | None:
        """Take the execution lock of a step (re-entrant for this process).

        The lock is a POSIX record lock on one byte of ``STORE/cache.db-locks``
        (the byte at 62 bits of the SHA-1 of ``run/step``): the OS releases it when
        its process dies, so a lock is never stale, needs no pid checks and costs
        no SQL. Returns None: a dead holder's lock is simply free (format 1's SQL
        lock rows had an owner to take over; PgStore still reports one).
        """
        fd = self._lock_fd()
        offset = _lock_offset(run, step_id)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise store_error(e, self.path) from e
            pid = _lock_holder(fd, offset)
            raise StepLockedError(
                f"step {step_id!r} of run {run!r} is being executed by process "
                f"{pid if pid is not None else '(unknown)'}"
                f"{'' if pid is not None else ' on another machine'}. Wait for it to finish, "
                "or stop that kernel; the lock is freed when its process ends."
            ) from None
        return None

    def release_lock(self, run: str, step_id: str) -> None:
        fd = self._lock_fd()
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _lock_offset(run, step_id), os.SEEK_SET)

    # -- key-value records for the LLM ledger and side effects ---------------

    def get_record(self, kind: str, key: str) -> Any:
        return self._get_json(f"{kind}/{key}")

    def record_keys(self, kind: str, prefix: str) -> set[str]:
        """The keys of the records of ``kind`` that start with ``prefix`` (one range read)."""
        lo = f"{kind}/{prefix}"
        args = _range(lo)
        rows = (
            self._exec(_RANGE_KEYS, args)
            if self._only_mine(lo, True)
            else self._rows(_RANGE_KEYS, args)
        )
        return {key[len(kind) + 1 :] for (key,) in rows}

    def add_record(self, kind: str, key: str, value: Any) -> bool:
        """Store a record unless one exists; True when this call stored it."""
        return bool(self._rows(_ADD, (f"{kind}/{key}", _to_json(value))))

    def set_record(self, kind: str, key: str, value: Any) -> None:
        rows = getattr(self._tls, "batch", None)
        if rows is not None:
            rows[f"{kind}/{key}"] = _to_json(value)
            return
        self._set_json(f"{kind}/{key}", value)

    def delete_record(self, kind: str, key: str) -> None:
        self._rows(_DELETE, (f"{kind}/{key}",))

    # -- trace ----------------------------------------------------------------

    def add_trace(self, row: dict[str, Any], defer: bool = False) -> None:
        """Append one trace row (unknown keys go to the JSON ``detail`` column).

        ``defer=True`` (a replay's row: it records nothing that must survive a
        crash) keeps the row in memory, saving a write commit on the replay: it is
        written, in order, before this store's next trace row (in the same
        transaction, so with the next step commit), when the trace is read
        (:meth:`trace_rows`) and when the process exits. A process killed before
        that loses the rows of its latest replays, never anything else.
        """
        batch = getattr(self._tls, "batch", None)
        if batch is not None and not defer:  # waits as a pend/ record, as a step's row does
            values = trace_values(row)
            kept = {c: v for c, v in zip(TRACE_COLUMNS, values, strict=True) if v is not None}
            batch[next(self._pending_keys)] = _to_json([kept, row.get("run"), 0])
            return
        if defer:
            row.setdefault("ts", time.time())  # when it happened, not when it is written
            with self._deferred_lock:
                if not self._deferred:
                    _deferring.add(self)
                self._deferred.append(row)
            return
        # rows waiting as pend/ records come first, this process's and any other's (one
        # that died before moving its own): a trace keeps the order things happened in
        if self._deferred or self._own_pending or self._rows(_ANY_PENDING, ()):
            with self.transaction():
                self._flush_trace(everyone=True)
                self._rows(*_trace_insert(row))
            return
        self._rows(*_trace_insert(row))

    def _flush_trace(self, everyone: bool = False) -> None:
        """Write what waits for the trace, in order, in one transaction: the ``pend/``
        records (steps' rows and counts, see commit_step) this process wrote (with
        ``everyone``: any process's), then the deferred rows (replays)."""
        with self._deferred_lock:
            rows, self._deferred = self._deferred, []
            _deferring.discard(self)
        if not (rows or self._own_pending or (everyone and self._rows(_ANY_PENDING, ()))):
            return
        try:
            with self.transaction():
                self._move_pending()
                for row in rows:
                    self._rows(*_trace_insert(row))
        except BaseException:
            with self._deferred_lock:
                self._deferred[:0] = rows
                _deferring.add(self)
            raise

    def _move_pending(self) -> None:
        """Every ``pend/`` record, oldest first, to a trace row and the run's step count."""
        with self.transaction():
            found = self._rows(_PENDING, _range("pend/"))
            counts: dict[str, int] = {}
            for key, raw in found:
                item = self._parse_json(key, raw)
                if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], dict)):
                    raise StoreError(
                        f"the entry {key!r} in the nbagent store at {self.path} is damaged (not "
                        "a pending trace row); nothing was read past it. Move the store aside "
                        "and start again with a fresh --store folder."
                    )
                row, run, count = item
                self._rows(*_trace_insert(row))
                if count:
                    counts[run] = counts.get(run, 0) + int(count)
            for run, count in counts.items():
                self.incr(run, "steps", count)
            if found:
                self._rows(_DELETE_RANGE, _range("pend/"))
        self._own_pending = 0

    def trace_rows(
        self, run: str | None = None, since_seq: int = 0
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Columns (with ``seq`` first) and rows of the trace, oldest first."""
        self._flush_trace(everyone=True)
        sql = f"SELECT seq, {', '.join(TRACE_COLUMNS)} FROM trace WHERE seq > ?"
        args: tuple[Any, ...] = (since_seq,)
        if run is not None:
            sql += " AND run = ?"
            args = (since_seq, run)
        return ["seq", *TRACE_COLUMNS], self._rows(sql + " ORDER BY seq", args)

    def delete_trace(self, run: str) -> None:
        self._flush_trace(everyone=True)
        self._rows("DELETE FROM trace WHERE run = ?", (run,))

    def flush(self) -> None:
        """Move what waits into SQLite: the step log (see _steplog), then the trace rows
        and step counts waiting as ``pend/`` records, and the deferred trace rows.
        Reads do it when they need to; ``close`` and the process's exit do it too."""
        self._flush_trace(everyone=True)
        if self._log is not None and self._log.pending():
            with self.transaction():  # a transaction moves the log first
                pass

    def close(self) -> None:
        if self._deferred or self._logged or self._own_pending:
            with contextlib.suppress(Exception):
                self.flush()
        self._checkpointer.stop()
        self._kv.close()
        self._tls = threading.local()
        self._known.clear()
        self._versions.close()
        if self._log is not None:
            self._log.close()
            self._log = None


#: stores holding deferred trace rows; written when the process exits
_deferring: set[Store] = set()


@atexit.register
def _flush_deferred_traces() -> None:
    for store in list(_deferring):
        with contextlib.suppress(Exception):
            store.flush()


#: every Store of this process, for _forget_connections
_all_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _forget_connections() -> None:
    """In a forked child: connections are the parent's; diskcache opens new ones."""
    for store in list(_all_stores):
        store._tls = threading.local()
        store._changes = []  # another thread's transaction, if any, is the parent's
        store._pending_keys = _pending_keys()
        if store._log is not None:
            store._log.reopen()


os.register_at_fork(after_in_child=_forget_connections)

_open_stores: dict[Path, Store] = {}
_open_lock = threading.Lock()


def open_store(directory: str | os.PathLike[str] | None = None) -> Store:
    """The (shared, per-process) Store for a directory; default :func:`default_store_dir`."""
    path = Path(directory if directory is not None else default_store_dir()).expanduser().resolve()
    with _open_lock:
        store = _open_stores.get(path)
        if store is None:
            store = _open_stores[path] = Store(path)
        return store
