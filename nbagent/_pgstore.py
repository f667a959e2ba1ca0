"""The nbagent store on PostgreSQL: one ledger shared by every worker on every machine.

Design: when steps run as DBOS workflows on PostgreSQL, nbagent's own state
(runs, step records and their signed value blobs, caps, spend and
reservations, the LLM call ledger, side-effect records, step locks and the
trace) lives in the *same* PostgreSQL database as DBOS's system tables, in a
schema of its own (``nbagent`` by default; DBOS uses ``dbos``). One server to
run, back up and secure; a reservation made by a worker on one machine is seen
by a worker on any other, so two workers cannot both spend the last dollar.

Layout (schema ``nbagent``)::

    kv(key text primary key, value text, data bytea)
        the same keys as the embedded store (``run/NAME``, ``step/RUN/ID``,
        ``llm/...``, ``effect/...``, ``lock/RUN/ID``; JSON in ``value``) and
        the signed blobs (``blob/...``, bytes in ``data``); ``meta/format`` is
        the layout version and ``meta/id`` the store's id
    counters(key text primary key, value bigint)
        ``RUN/spend_nusd``, ``RUN/reserved_nusd``, ``RUN/llm_calls``,
        ``RUN/steps`` (money in integer nano-dollars)
    trace(seq bigserial primary key, ts, run, step, kind, ...)
        the columns of :data:`nbagent._store.TRACE_COLUMNS`

Atomicity: :meth:`PgStore.transaction` is a database transaction that holds
``pg_advisory_xact_lock`` on one store-wide key, and every write outside a
transaction holds the same key in *shared* mode. So a transaction excludes all
other writers of the store on every machine while it runs (as the embedded
store's SQLite ``BEGIN IMMEDIATE`` does on one machine), and plain writes do
not wait for each other.

Step locks are PostgreSQL *session* advisory locks held on a connection of the
process executing the step: when that process dies, on whatever machine, the
server ends its session and frees the lock, and the next executor takes the
step over (the engine traces the takeover). No pid guessing across hosts.

Blobs are pickles, and unpickling runs code: as in the embedded store each one
carries a signature (keyed BLAKE3; format 1 used HMAC-SHA256) made with a per-store key kept *outside* the
database (``~/.local/share/nbagent/keys/ID.key`` or ``NBAGENT_KEY_DIR``). Every
machine that replays steps needs a copy of that key file; a blob whose
signature does not verify is never unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._errors import StepLockedError, StoreError, StoreFormatError
from ._store import _INLINE_BLOB, _RUN_KINDS, TRACE_COLUMNS, UNREAD, Decide, Store, _me

#: Version of the PostgreSQL layout (independent of the embedded store's).
#: 2: value blobs as Store format 3 signs them (keyed BLAKE3, ``NBA2``); format 1's are read.
PG_FORMAT_VERSION = 2

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            user, password = userinfo.split(":", 1)
            userinfo = f"{user}:***" if password else user
        netloc = f"{userinfo}@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def libpq_url(url: str) -> str:
    """A SQLAlchemy-style URL (``postgresql+psycopg://``) as libpq wants it."""
    return re.sub(r"^postgres(?:ql)?\+[a-z0-9_]+://", "postgresql://", url)


def _key64(text: str) -> int:
    """A signed 64-bit advisory-lock key for a name."""
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True
    )


def _trace_values(row: dict[str, Any]) -> list[Any]:
    """A trace row as the values of TRACE_COLUMNS (unknown keys go to ``detail``)."""
    values = [row.get(c) for c in TRACE_COLUMNS]
    extra = {k: v for k, v in row.items() if k not in TRACE_COLUMNS}
    if extra:
        detail = row.get("detail") or {}
        values[-1] = {**(detail if isinstance(detail, dict) else {"detail": detail}), **extra}
    for i, c in enumerate(TRACE_COLUMNS):
        if (
            c in ("request", "response", "detail")
            and values[i] is not None
            and not isinstance(values[i], str)
        ):
            values[i] = json.dumps(values[i], default=str)
    if values[0] is None:
        values[0] = time.time()
    for i, c in enumerate(TRACE_COLUMNS):
        value = values[i]
        if c in ("replayed", "price_known") and isinstance(value, bool):
            values[i] = int(value)
    return values


_TRACE_TYPES = {
    "ts": "double precision NOT NULL",
    "run": "text NOT NULL",
    "kind": "text NOT NULL",
    "attempt": "integer",
    "wait_s": "double precision",
    "input_tokens": "bigint",
    "cached_tokens": "bigint",
    "output_tokens": "bigint",
    "reasoning_tokens": "bigint",
    "cost_usd": "double precision",
    "latency_s": "double precision",
    "replayed": "integer",
    "price_known": "integer",
}


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.conn: Any = None
        self.depth = 0
        self.unlocks: list[str] = []


class PgStore(Store):
    """An nbagent store in a PostgreSQL database; safe to share between processes and machines.

    Same interface as :class:`nbagent._store.Store` (so ``nbagent.Run(name,
    store=PgStore(url))`` works unchanged). Use :func:`open_pg_store` to get
    the one shared instance per process.

    :param url: ``postgresql://user:password@host:port/db`` (``postgresql+psycopg://``
        is accepted too).
    :param schema: schema of nbagent's tables (created if missing).
    :param connect_timeout: seconds to wait for the server before giving up.
    """

    def __init__(self, url: str, *, schema: str = "nbagent", connect_timeout: float = 10) -> None:
        try:
            import psycopg
        except ImportError as e:  # pragma: no cover - psycopg comes with the dbos extra
            raise StoreError(
                "the PostgreSQL store needs psycopg 3: install it with "
                "pip install 'nbagent[dbos]' (or pip install 'psycopg[binary]')."
            ) from e
        self._psycopg = psycopg
        if not _SCHEMA_RE.match(schema):
            raise StoreError(
                f"schema name {schema!r} is not valid: use lowercase letters, digits and '_'."
            )
        self.url = url
        self.schema = schema
        # The store's location for messages: never the password.
        self.path = mask_url(url) + (f" (schema {schema})" if schema != "nbagent" else "")  # type: ignore[assignment]
        self._dsn = libpq_url(url)
        self._timeout = max(1, int(connect_timeout))
        self._t = {n: f'"{schema}".{n}' for n in ("kv", "counters", "trace")}
        self._store_key = _key64(f"nbagent:{schema}:store")
        self._pid = os.getpid()
        self._state = _ThreadState()
        self._conns: list[Any] = []
        self._conns_lock = threading.Lock()
        self._lock_conn: Any = None
        self._lock_mutex = threading.Lock()
        self._held: set[str] = set()
        self._closed = False
        self._init_schema()
        self._check_format()
        self.id: str = self._get_json("meta/id") or ""
        if not self.id:
            self.add_record("meta", "id", uuid.uuid4().hex)
            self.id = self._get_json("meta/id")
        self._key = self._signing_key()

    def __repr__(self) -> str:
        return f"<nbagent.PgStore {self.path}>"

    # -- connections -----------------------------------------------------------------

    def _connect(self) -> Any:
        psycopg = self._psycopg
        try:
            return psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=self._timeout,
                application_name="nbagent",
            )
        except psycopg.Error as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise StoreError(
                f"cannot connect to the PostgreSQL database at {self.path} ({first}). "
                "Check that the server is running and reachable and that the URL's user, "
                "password, host, port and database are right; pass it with --db URL or "
                "NBAGENT_DB_URL (or run on one machine with a sqlite:/// URL or the "
                "embedded store)."
            ) from e

    def _after_fork(self) -> None:
        # Connections inherited from the parent belong to the parent's sessions:
        # forget them without closing (closing would end the parent's sessions).
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._state = _ThreadState()
            self._conns = []
            self._lock_conn = None
            self._held = set()

    def _conn(self) -> Any:
        self._after_fork()
        if self._closed:
            raise StoreError(f"the nbagent store at {self.path} was closed")
        st = self._state
        conn = st.conn
        if conn is None or (conn.closed and not st.depth):
            conn = st.conn = self._connect()
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _lock_connection(self) -> Any:
        self._after_fork()
        if self._lock_conn is None or self._lock_conn.closed:
            if self._lock_conn is not None:
                self._held.clear()  # the session ended: the server freed its locks
            self._lock_conn = self._connect()
        return self._lock_conn

    def _init_schema(self) -> None:
        kv, counters, trace = self._t["kv"], self._t["counters"], self._t["trace"]
        cols = ",\n".join(f"{c} {_TRACE_TYPES.get(c, 'text')}" for c in TRACE_COLUMNS)
        conn = self._conn()
        with conn.transaction():
            # Serialize first-time creation between processes (CREATE ... IF NOT
            # EXISTS is not safe against a concurrent twin).
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (_key64(f"nbagent:{self.schema}:init"),)
            )
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {kv} (key text PRIMARY KEY, value text, data bytea)"
            )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {counters} (key text PRIMARY KEY, value bigint NOT NULL)"
            )
            conn.execute(f"CREATE TABLE IF NOT EXISTS {trace} (seq bigserial PRIMARY KEY, {cols})")
            conn.execute(f"CREATE INDEX IF NOT EXISTS trace_run ON {trace} (run, seq)")

    def _check_format(self) -> None:
        found = self._get_json("meta/format")
        if found is None:
            self.add_record("meta", "format", PG_FORMAT_VERSION)
            found = self._get_json("meta/format")
        if not isinstance(found, int) or found > PG_FORMAT_VERSION:
            raise StoreFormatError(
                f"the nbagent store at {self.path} has format {found!r}, but this nbagent "
                f"reads format {PG_FORMAT_VERSION} or older. Upgrade nbagent "
                "(pip install -U nbagent) or use another database or schema; nothing was changed."
            )
        if found < PG_FORMAT_VERSION:  # 1 -> 2: nothing moves (older blobs are read as they are)
            self._set_json("meta/format", PG_FORMAT_VERSION)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """A connection to write on: inside the current transaction, or a short one of its own."""
        conn = self._conn()
        if self._state.depth:
            yield conn
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._store_key,))
            yield conn

    def _get_json(self, key: str) -> Any:
        row = (
            self._conn()
            .execute(f"SELECT value FROM {self._t['kv']} WHERE key = %s", (key,))
            .fetchone()
        )
        return None if row is None or row[0] is None else json.loads(row[0])

    def _set_json(self, key: str, value: Any) -> None:
        with self._writing() as conn:
            conn.execute(
                f"INSERT INTO {self._t['kv']} (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, data = NULL",
                (key, json.dumps(value, default=str)),
            )

    def _delete(self, key: str) -> None:
        with self._writing() as conn:
            conn.execute(f"DELETE FROM {self._t['kv']} WHERE key = %s", (key,))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic read-modify-write across processes and machines.

        A database transaction holding ``pg_advisory_xact_lock`` on the store's
        key: it excludes every other transaction and write of this store
        until it commits. Nested calls join the outer transaction.
        """
        st = self._state
        if st.depth:
            st.depth += 1
            try:
                yield
            finally:
                st.depth -= 1
            return
        conn = self._conn()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._store_key,))
                st.depth = 1
                try:
                    yield
                finally:
                    st.depth = 0
        finally:
            unlocks, st.unlocks = st.unlocks, []
            for name in unlocks:
                self._unlock(name)

    # -- blobs (signed pickles; sign/verify come from Store) -------------------------

    def put_blob(self, key: str, payload: bytes) -> None:
        with self._writing() as conn:
            conn.execute(
                f"INSERT INTO {self._t['kv']} (key, value, data) VALUES (%s, NULL, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = NULL, data = EXCLUDED.data",
                (f"blob/{key}", self.sign(payload)),
            )

    def get_blob(self, key: str) -> bytes | memoryview | None:
        """Verified payload; None if missing. Raises StoreError if tampered."""
        row = (
            self._conn()
            .execute(f"SELECT data FROM {self._t['kv']} WHERE key = %s", (f"blob/{key}",))
            .fetchone()
        )
        if row is None or row[0] is None:
            return None
        payload = self.verify(bytes(row[0]))
        if payload is None:
            raise StoreError(
                f"the stored value {key!r} in {self.path} is not signed by this store's key "
                f"(it was changed by someone else, or the key file {self.id}.key under "
                "~/.local/share/nbagent/keys or NBAGENT_KEY_DIR is missing on this machine: "
                "copy it from the machine that created the store). It was not loaded. "
                "Re-run the step with --rerun to store it again."
            )
        return payload

    def delete_blob(self, key: str) -> None:
        self._delete(f"blob/{key}")

    # -- runs and counters -----------------------------------------------------------

    def get_run(self, run: str) -> dict[str, Any] | None:
        return self._get_json(f"run/{run}")

    def put_run(self, run: str, record: dict[str, Any]) -> None:
        with self.transaction():
            self._set_json(f"run/{run}", record)
            names = self._get_json("runs") or []
            if run not in names:
                names.append(run)
                self._set_json("runs", names)

    def runs(self) -> list[str]:
        return list(self._get_json("runs") or [])

    def counter(self, run: str, name: str) -> int:
        row = (
            self._conn()
            .execute(f"SELECT value FROM {self._t['counters']} WHERE key = %s", (f"{run}/{name}",))
            .fetchone()
        )
        return 0 if row is None else int(row[0])

    def run_state(
        self, run: str, counters: tuple[str, ...]
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The run's record (``{}`` if missing) and some of its counters (see Store.run_state)."""
        return self.get_run(run) or {}, {name: self.counter(run, name) for name in counters}

    def incr(self, run: str, name: str, delta: int = 1) -> int:
        with self._writing() as conn:
            row = conn.execute(
                f"INSERT INTO {self._t['counters']} AS c (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = c.value + EXCLUDED.value RETURNING value",
                (f"{run}/{name}", int(delta)),
            ).fetchone()
        return int(row[0])

    def incr_many(self, run: str, deltas: dict[str, int]) -> dict[str, int]:
        """:meth:`incr` of several counters in one statement; their new values."""
        keys = {f"{run}/{name}": name for name in deltas}
        values = ", ".join(["(%s, %s)"] * len(keys))
        args = [x for key, name in keys.items() for x in (key, int(deltas[name]))]
        with self._writing() as conn:
            rows = conn.execute(
                f"INSERT INTO {self._t['counters']} AS c (key, value) VALUES {values} "
                "ON CONFLICT (key) DO UPDATE SET value = c.value + EXCLUDED.value "
                "RETURNING key, value",
                args,
            ).fetchall()
        return {keys[key]: int(value) for key, value in rows}

    # -- steps -----------------------------------------------------------------------

    def get_step(self, run: str, step_id: str) -> dict[str, Any] | None:
        return self._get_json(f"step/{run}/{step_id}")

    def get_step_values(
        self, run: str, step_id: str
    ) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
        return self.get_step(run, step_id), {}  # values are read one by one

    def step_ids(self, run: str) -> list[str]:
        return list(self._get_json(f"steps/{run}") or [])

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
        """Store a finished step and release its lock, in one transaction (see Store.commit_step).

        Large blobs are written first, outside the transaction; a crash before
        the transaction leaves orphan blobs, never a record naming a missing blob.
        """
        small = {}
        for name, payload in blobs.items():
            if len(payload) > _INLINE_BLOB:
                self.put_blob(f"{run}/{step_id}/{name}", payload)
            else:
                small[name] = payload
        with self.transaction():
            old = self.get_step(run, step_id) or {}  # (previous: read again, for the steps list)
            for name, payload in small.items():
                self.put_blob(f"{run}/{step_id}/{name}", payload)
            self._set_json(f"step/{run}/{step_id}", record)
            if not old:
                ids = self._get_json(f"steps/{run}") or []
                if step_id not in ids:
                    ids.append(step_id)
                    self._set_json(f"steps/{run}", ids)
            if trace is not None:
                self.add_trace(trace)
            if count:
                self.incr(run, "steps")
            self.release_lock(run, step_id)
        for name in set(old.get("saved", [])) - set(blobs):
            self.delete_blob(f"{run}/{step_id}/{name}")

    def drop_step(self, run: str, step_id: str) -> bool:
        record = self.get_step(run, step_id)
        with self.transaction():
            self._delete(f"step/{run}/{step_id}")
            ids = [i for i in self._get_json(f"steps/{run}") or [] if i != step_id]
            self._set_json(f"steps/{run}", ids)
        for name in (record or {}).get("saved", []):
            self.delete_blob(f"{run}/{step_id}/{name}")
        return record is not None

    def begin_step(
        self, run: str, step_id: str
    ) -> tuple[dict[str, Any] | None, int | None, dict[str, Any], dict[str, Any] | None]:
        """Lock a step and count its execution when the run has a step cap (see Store.begin_step)."""
        with self.transaction():
            record = self.get_run(run) or {}
            owner = self.acquire_lock(run, step_id)
            step = self.get_step(run, step_id)
            if (record.get("caps") or {}).get("steps") is None:
                return owner, None, record, step
            count = self.incr(run, "steps")
        return owner, count, record, step

    def undo_begin(self, run: str, step_id: str, counted: bool = True) -> None:
        with self.transaction():
            if counted:
                self.incr(run, "steps", -1)
            self.release_lock(run, step_id)

    # -- step locks: session advisory locks, freed by the server when a holder dies ---

    def acquire_lock(self, run: str, step_id: str) -> dict[str, Any] | None:
        """Take the execution lock of a step; return the dead owner taken over, if any."""
        name = f"{run}/{step_id}"
        key = f"lock/{name}"
        me = {**_me(), "since": time.time()}
        with self._lock_mutex:
            if name not in self._held:
                got = (
                    self._lock_connection()
                    .execute(
                        "SELECT pg_try_advisory_lock(%s)",
                        (_key64(f"nbagent:{self.schema}:lock:{name}"),),
                    )
                    .fetchone()[0]
                )
                if not got:
                    owner = self._get_json(key) or {}
                    since = time.strftime("%H:%M:%S", time.localtime(owner.get("since", 0)))
                    raise StepLockedError(
                        f"step {step_id!r} of run {run!r} is being executed by process "
                        f"{owner.get('pid', '?')} on {owner.get('host', '?')} (since {since}). "
                        "Wait for it to finish, or stop that process; a lock held by a dead "
                        "process is freed by PostgreSQL and taken over."
                    )
                self._held.add(name)
        owner = self._get_json(key)
        mine = (
            owner is not None and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]
        )
        self._set_json(key, me)
        return None if owner is None or mine else owner

    def release_lock(self, run: str, step_id: str) -> None:
        name = f"{run}/{step_id}"
        self._delete(f"lock/{name}")
        if self._state.depth:
            self._state.unlocks.append(name)  # after the deletion commits
        else:
            self._unlock(name)

    def _unlock(self, name: str) -> None:
        with self._lock_mutex:
            if name not in self._held:
                return
            self._held.discard(name)
            if self._lock_conn is None or self._lock_conn.closed:
                return
            with contextlib.suppress(self._psycopg.Error):
                self._lock_conn.execute(
                    "SELECT pg_advisory_unlock(%s)", (_key64(f"nbagent:{self.schema}:lock:{name}"),)
                )

    # -- records for the LLM ledger and side effects --------------------------------

    def get_record(self, kind: str, key: str) -> Any:
        return self._get_json(f"{kind}/{key}")

    def add_record(self, kind: str, key: str, value: Any) -> bool:
        """Store a record unless one exists; True when this call stored it."""
        with self._writing() as conn:
            row = conn.execute(
                f"INSERT INTO {self._t['kv']} (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO NOTHING RETURNING 1",
                (f"{kind}/{key}", json.dumps(value, default=str)),
            ).fetchone()
        return row is not None

    def set_record(self, kind: str, key: str, value: Any) -> None:
        self._set_json(f"{kind}/{key}", value)

    def delete_record(self, kind: str, key: str) -> None:
        self._delete(f"{kind}/{key}")

    # -- trace -----------------------------------------------------------------------

    def add_trace(self, row: dict[str, Any], defer: bool = False) -> None:
        """Append one trace row (unknown keys go to the JSON ``detail`` column).

        ``defer`` is accepted for Store's signature; PostgreSQL rows are written now.
        """
        values = _trace_values(row)
        self._conn().execute(
            f"INSERT INTO {self._t['trace']} ({', '.join(TRACE_COLUMNS)}) "
            f"VALUES ({', '.join(['%s'] * len(TRACE_COLUMNS))})",
            values,
        )

    def trace_rows(
        self, run: str | None = None, since_seq: int = 0
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Columns (with ``seq`` first) and rows of the trace, oldest first."""
        sql = f"SELECT seq, {', '.join(TRACE_COLUMNS)} FROM {self._t['trace']} WHERE seq > %s"
        args: list[Any] = [since_seq]
        if run is not None:
            sql += " AND run = %s"
            args.append(run)
        rows = self._conn().execute(sql + " ORDER BY seq", args).fetchall()
        return ["seq", *TRACE_COLUMNS], rows

    def drop_run(self, run: str) -> int:
        steps = len(self.step_ids(run))
        prefixes = [f"{kind}/{run}/" for kind in _RUN_KINDS]
        with self.transaction():
            conn = self._conn()
            conn.execute(
                f"DELETE FROM {self._t['kv']} WHERE key = ANY(%s) OR "
                + " OR ".join("left(key, %s) = %s" for _ in prefixes),
                [
                    [f"run/{run}", f"dbos/{run}", f"steps/{run}"],
                    *[x for p in prefixes for x in (len(p), p)],
                ],
            )
            conn.execute(
                f"DELETE FROM {self._t['counters']} WHERE left(key, %s) = %s",
                (len(run) + 1, f"{run}/"),
            )
            self._set_json("runs", [r for r in self.runs() if r != run])
        self.delete_trace(run)
        return steps

    def delete_trace(self, run: str) -> None:
        self._conn().execute(f"DELETE FROM {self._t['trace']} WHERE run = %s", (run,))

    def flush(self) -> None:
        """Nothing waits here: every write reaches PostgreSQL when it is made."""

    def record_keys(self, kind: str, prefix: str) -> set[str]:
        lo = f"{kind}/{prefix}"
        rows = (
            self._conn()
            .execute(f"SELECT key FROM {self._t['kv']} WHERE starts_with(key, %s)", (lo,))
            .fetchall()
        )
        return {key[len(kind) + 1 :] for (key,) in rows}

    def add_if(self, run: str, counters: tuple[str, ...], decide: Decide) -> dict[str, int] | None:
        """See Store.add_if: here one transaction."""
        return self._add_in_transaction(run, counters, decide)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction (PostgreSQL commits are what this store has)."""
        with self.transaction():
            yield

    def incr_blind(self, run: str, deltas: dict[str, int]) -> None:
        self.incr_many(run, deltas)

    def close(self) -> None:
        """Close every connection (frees the step locks this process held)."""
        self._after_fork()
        with self._conns_lock:
            conns, self._conns = self._conns, []
        with self._lock_mutex:
            if self._lock_conn is not None:
                conns.append(self._lock_conn)
                self._lock_conn = None
            self._held.clear()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._state = _ThreadState()
        self._closed = True
        with _open_lock:
            for k, v in list(_open_pg_stores.items()):
                if v is self:
                    del _open_pg_stores[k]


_open_pg_stores: dict[tuple[str, str], PgStore] = {}
_open_lock = threading.Lock()


def open_pg_store(url: str, schema: str = "nbagent") -> PgStore:
    """The shared, per-process PgStore for a database URL and schema."""
    with _open_lock:
        store = _open_pg_stores.get((url, schema))
        if store is None or store._closed:
            store = _open_pg_stores[(url, schema)] = PgStore(url, schema=schema)
        return store


def is_postgres_url(url: str) -> bool:
    return bool(re.match(r"^postgres(?:ql)?(?:\+[a-z0-9_]+)?://", url or ""))


__all__ = ["PG_FORMAT_VERSION", "PgStore", "is_postgres_url", "mask_url", "open_pg_store"]
