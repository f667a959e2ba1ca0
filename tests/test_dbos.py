"""nbagent on DBOS with a real PostgreSQL: the PostgreSQL store, crash recovery, queue workers."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pg_fixture import pg_server, pg_url  # noqa: F401 - fixtures

import nbagent
from nbagent._errors import CostCapExceeded, StoreError, StoreFormatError
from nbagent._pgstore import PG_FORMAT_VERSION, PgStore, mask_url
from nbagent._store import NANO, Store

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _sql(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else []


class _Bomb:
    """Creates a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


# -- no server needed ------------------------------------------------------------------


def test_pgstore_overrides_every_public_store_method() -> None:
    """PgStore subclasses Store (so Run accepts it); nothing may fall through to diskcache."""
    inherited_ok = {"sign", "verify", "verify_blob"}  # no storage: the signature only
    public = {n for n in vars(Store) if not n.startswith("__") and callable(getattr(Store, n))}
    public = {n for n in public if not n.startswith("_") or n in ("_get_json", "_set_json")}
    missing = sorted(n for n in public - inherited_ok if n not in vars(PgStore))
    assert missing == []


def test_unreachable_database_is_a_clear_error_without_the_password() -> None:
    url = "postgresql://agent:s3cret-pw@127.0.0.1:1/agents"
    with pytest.raises(StoreError) as err:
        PgStore(url, connect_timeout=2)
    message = str(err.value)
    assert "127.0.0.1:1/agents" in message and "agent:***@" in message
    assert "s3cret-pw" not in message
    assert "--db" in message and "NBAGENT_DB_URL" in message
    assert mask_url("postgresql://u:@h/db") == "postgresql://u@h/db"


def test_launch_on_an_unreachable_database_names_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbagent import dbos_engine

    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1") as err:
        dbos_engine.launch("postgresql://agent:s3cret-pw@127.0.0.1:1/agents")
    assert "s3cret-pw" not in str(err.value)
    with pytest.raises(nbagent.NbagentError, match="NBAGENT_DB_URL"):
        monkeypatch.delenv("NBAGENT_DB_URL", raising=False)
        dbos_engine.launch(None)
    with pytest.raises(nbagent.NbagentError, match="neither PostgreSQL nor SQLite"):
        dbos_engine.launch("mysql://u:p@h/db")


def test_missing_dbos_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbagent import dbos_engine

    real_import = builtins.__import__

    def no_dbos(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "dbos" or name.startswith("dbos."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dbos)
    with pytest.raises(dbos_engine.DbosEngineError) as err:
        dbos_engine.launch("sqlite:///x.sqlite")
    assert "pip install 'nbagent[dbos]'" in str(err.value)


# -- the PostgreSQL store ------------------------------------------------------------------


@pytest.mark.slow
def test_pgstore_contract(pg_url: str) -> None:  # noqa: F811
    store = PgStore(pg_url)
    assert str(store.path) == mask_url(pg_url)
    # runs, counters, records
    store.put_run("a", {"name": "a"})
    store.put_run("b", {"name": "b"})
    store.put_run("a", {"name": "a", "x": 1})
    assert store.runs() == ["a", "b"] and store.get_run("a") == {"name": "a", "x": 1}
    assert store.counter("a", "n") == 0
    assert store.incr("a", "n", 5) == 5 and store.incr("a", "n", -2) == 3
    assert store.counter("a", "n") == 3
    assert store.add_record("llm", "k", {"v": 1}) is True
    assert store.add_record("llm", "k", {"v": 2}) is False
    assert store.get_record("llm", "k") == {"v": 1}
    store.set_record("llm", "k", {"v": 3})
    assert store.get_record("llm", "k") == {"v": 3}
    store.delete_record("llm", "k")
    assert store.get_record("llm", "k") is None
    # steps and blobs
    store.commit_step("r", "a#1", {"saved": ["x", "y"]}, {"x": b"1", "y": b"2"})
    assert store.step_ids("r") == ["a#1"] and store.get_step("r", "a#1") == {"saved": ["x", "y"]}
    store.commit_step("r", "a#1", {"saved": ["x"]}, {"x": b"3"})
    assert store.get_blob("r/a#1/x") == b"3" and store.get_blob("r/a#1/y") is None
    big = os.urandom(3 << 20)
    store.put_blob("r/a#1/big", big)
    assert bytes(store.get_blob("r/a#1/big") or b"") == big
    assert store.drop_step("r", "a#1") is True and store.step_ids("r") == []
    assert store.drop_step("r", "a#1") is False
    # trace
    store.add_trace({"run": "r", "kind": "llm", "cost_usd": 0.5, "replayed": True, "extra": 1})
    cols, rows = store.trace_rows("r")
    row = dict(zip(cols, rows[0], strict=True))
    assert row["kind"] == "llm" and row["cost_usd"] == 0.5 and row["replayed"] == 1
    assert json.loads(row["detail"]) == {"extra": 1}
    store.delete_trace("r")
    assert store.trace_rows("r")[1] == []
    # a second instance (another process, another machine) sees the same state and key
    other = PgStore(pg_url)
    assert other.id == store.id and other.counter("a", "n") == 3
    assert other.get_blob("r/a#1/big") is not None
    store.close()
    other.close()


@pytest.mark.slow
def test_pgstore_drop_run_removes_everything_of_that_run_only(pg_url: str) -> None:  # noqa: F811
    from test_store import check_only_gone_was_dropped, fill_two_runs

    store = PgStore(pg_url)
    for run in store.runs():
        store.drop_run(run)
    fill_two_runs(store)
    assert store.drop_run("gone") == 1
    check_only_gone_was_dropped(store)
    store.close()


@pytest.mark.slow
def test_pgstore_blobs_are_signed_and_tampering_never_unpickles(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = PgStore(pg_url)
    store.put_blob("r/a#1/x", b"payload")
    raw = _sql(pg_url, "SELECT data FROM nbagent.kv WHERE key = 'blob/r/a#1/x'")[0][0]
    assert bytes(raw) != b"payload" and bytes(raw).endswith(b"payload")
    assert (tmp_path / "keys" / f"{store.id}.key").exists()  # the key is outside the database
    boom = tmp_path / "boom"
    _sql(
        pg_url,
        "UPDATE nbagent.kv SET data = %s WHERE key = 'blob/r/a#1/x'",
        pickle.dumps(_Bomb(boom)),
    )
    with pytest.raises(StoreError, match="not signed"):
        store.get_blob("r/a#1/x")
    assert not boom.exists()
    store.put_blob("r/a#1/x", b"again")
    store.close()
    monkeypatch.setenv("NBAGENT_KEY_DIR", str(tmp_path / "other-keys"))  # a machine without the key
    with pytest.raises(StoreError, match="not signed"):
        PgStore(pg_url).get_blob("r/a#1/x")


@pytest.mark.slow
def test_pgstore_of_a_newer_format_is_refused(pg_url: str) -> None:  # noqa: F811
    PgStore(pg_url).close()
    assert _sql(pg_url, "SELECT value FROM nbagent.kv WHERE key = 'meta/format'") == [
        (str(PG_FORMAT_VERSION),)
    ]
    _sql(
        pg_url,
        "UPDATE nbagent.kv SET value = %s WHERE key = 'meta/format'",
        str(PG_FORMAT_VERSION + 1),
    )
    with pytest.raises(StoreFormatError, match="pip install -U nbagent"):
        PgStore(pg_url)


@pytest.mark.slow
def test_run_on_pgstore_keeps_caps_and_spend(pg_url: str) -> None:  # noqa: F811
    store = PgStore(pg_url)
    run = nbagent.Run("r", store=store, max_cost_usd=1.0)
    calls = []

    @run.step("a")
    def a(x: int) -> int:
        calls.append(x)
        return x * 2

    assert a(3) == 6
    res = run.reserve(0.6)
    with pytest.raises(CostCapExceeded):
        run.reserve(0.5)
    run.settle(res, 0.25)
    again = nbagent.Run("r", store=PgStore(pg_url))
    assert again.spend_usd == pytest.approx(0.25) and again.max_cost_usd == 1.0
    a2 = again.step("a")(a.__wrapped__)  # type: ignore[attr-defined]
    assert a2(3) == 6 and calls == [3]  # replayed from PostgreSQL


_RACER = textwrap.dedent(
    """
    import sys, time
    import nbagent
    from nbagent._pgstore import PgStore
    url, start = sys.argv[1], float(sys.argv[2])
    run = nbagent.Run("race", store=PgStore(url))
    time.sleep(max(0.0, start - time.time()))
    won = 0
    for _ in range(30):
        try:
            r = run.reserve(0.1)
        except nbagent.CostCapExceeded:
            continue
        run.settle(r, 0.1)
        won += 1
    print(won)
    """
)


@pytest.mark.slow
def test_two_processes_cannot_both_reserve_the_last_dollar(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    store = PgStore(pg_url)
    nbagent.Run("race", store=store, max_cost_usd=1.0)
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    start = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), pg_url, str(start)],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(2)
    ]
    won = [int(p.communicate(timeout=60)[0].strip()) for p in procs]
    assert sum(won) == 10  # $1.00 cap / $0.10 per call, across both processes
    assert store.counter("race", "spend_nusd") == NANO
    assert store.counter("race", "reserved_nusd") == 0


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from nbagent._pgstore import PgStore
    store = PgStore(sys.argv[1])
    store.acquire_lock("r", "s#1")
    print("locked", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.slow
def test_step_lock_of_a_killed_process_is_taken_over(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    proc = subprocess.Popen(
        [sys.executable, str(script), pg_url], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        store = PgStore(pg_url)
        with pytest.raises(nbagent.StepLockedError, match=f"process {proc.pid}"):
            store.acquire_lock("r", "s#1")
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while True:  # the server notices the dead session within moments
        try:
            owner = store.acquire_lock("r", "s#1")
            break
        except nbagent.StepLockedError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    assert owner is not None and owner["pid"] == proc.pid
    store.release_lock("r", "s#1")


# -- DBOS: crash and recovery ------------------------------------------------------------------

_AGENT = textwrap.dedent(
    """
    import os, sys, time
    import nbagent
    from nbagent import dbos_engine

    OUT = os.environ["AGENT_OUT"]

    def mark(what):
        with open(os.path.join(OUT, "effects.log"), "a") as f:
            f.write(what + "\\n")

    def spend(run, usd):
        run.settle(run.reserve(usd), usd)

    def main(run, topic):
        @run.step("one")
        def one():
            mark("one")
            spend(run, 0.25)
            return topic.upper()

        @run.step("two")
        def two(x):
            mark("two")
            spend(run, 0.10)
            nbagent.once("email", lambda key: mark("email"))
            if not os.path.exists(os.path.join(OUT, "marker")):
                open(os.path.join(OUT, "marker"), "w").close()
                time.sleep(60)  # killed here on the first run
            return x + "!"

        @run.step("three")
        def three(x):
            mark("three")
            spend(run, 0.05)
            return x * 2

        return three(two(one()))

    if __name__ == "__main__":
        result = dbos_engine.run(
            "crash", main, "ok", db_url=sys.argv[1], max_cost_usd=1.0
        )
        print("RESULT", result, flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_mid_step_then_rerun_executes_only_unfinished_steps(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(_AGENT)
    env = {**_env(), "AGENT_OUT": str(tmp_path)}
    first = subprocess.Popen(
        [sys.executable, str(script), pg_url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not (tmp_path / "marker").exists():
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline, "step two never started"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    store = PgStore(pg_url)
    assert store.counter("crash", "spend_nusd") == int(0.35 * NANO)
    status = _sql(
        pg_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'nbagent:crash'"
    )
    assert status == [("PENDING",)]

    second = subprocess.run(
        [sys.executable, str(script), pg_url], env=env, capture_output=True, text=True, timeout=90
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "RESULT OK!OK!" in second.stdout
    effects = (tmp_path / "effects.log").read_text().split()
    assert effects.count("one") == 1  # completed before the crash: not executed again
    assert effects.count("two") == 2  # interrupted: executed again
    assert effects.count("three") == 1
    assert effects.count("email") == 1  # nbagent.once: never twice
    # spend was not reset: 0.25 + 0.10 before the crash, 0.10 + 0.05 after
    assert store.counter("crash", "spend_nusd") == int(0.50 * NANO)
    # the same workflow (its ID derived from the run) was recovered, not a new one started
    rows = _sql(pg_url, "SELECT workflow_uuid, status FROM dbos.workflow_status ORDER BY 1")
    assert rows == [("nbagent:crash", "SUCCESS")]
    steps = _sql(
        pg_url,
        "SELECT function_name FROM dbos.operation_outputs WHERE workflow_uuid = 'nbagent:crash' "
        "ORDER BY function_id",
    )
    assert [s[0] for s in steps] == ["one", "two", "three"]
    cols, trace = store.trace_rows("crash")
    i = {c: n for n, c in enumerate(cols)}
    statuses = [(r[i["step"]], r[i["status"]]) for r in trace if r[i["kind"]] == "step"]
    assert ("one#1", "replayed") in statuses and ("two#1", "takeover") in statuses

    # a finished run run again: the next generation, every step replayed from the store
    third = subprocess.run(
        [sys.executable, str(script), pg_url], env=env, capture_output=True, text=True, timeout=90
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert "RESULT OK!OK!" in third.stdout
    assert (tmp_path / "effects.log").read_text().split() == effects
    assert store.counter("crash", "spend_nusd") == int(0.50 * NANO)
    assert _sql(
        pg_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = 'nbagent:crash:2'"
    ) == [("SUCCESS",)]


# -- DBOS: a batch shared by two queue workers --------------------------------------------------

_BATCH_AGENT = textwrap.dedent(
    """
    import os, time

    def main(run, n):
        def log(step):
            with open(os.environ["AGENT_LOG"], "a") as f:
                f.write(f"{run.name} {step} {os.getpid()}\\n")

        @run.step("fetch")
        def fetch():
            log("fetch")
            time.sleep(0.3)
            return n

        @run.step("think")
        def think(x):
            log("think")
            time.sleep(0.3)
            return x * 10

        @run.step("write")
        def write(x):
            log("write")
            return f"{run.name}={x}"

        return write(think(fetch()))
    """
)

_ENQUEUE = textwrap.dedent(
    """
    import json, sys
    from nbagent import dbos_engine
    engine = dbos_engine.launch(sys.argv[1])
    agent = dbos_engine.load_script(sys.argv[2])
    ids = engine.enqueue_runs(["b1", "b2", "b3", "b4"], agent.main, 7)
    dbos_engine.shutdown()
    print(json.dumps(ids))
    """
)


@pytest.mark.slow
def test_two_workers_share_a_batch_and_execute_each_step_once(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    agent = tmp_path / "batch_agent.py"
    agent.write_text(_BATCH_AGENT)
    enqueue = tmp_path / "enqueue.py"
    enqueue.write_text(_ENQUEUE)
    env = {**_env(), "AGENT_LOG": str(tmp_path / "steps.log")}
    out = subprocess.run(
        [sys.executable, str(enqueue), pg_url, str(agent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert ids == {f"b{i}": f"nbagent:b{i}" for i in range(1, 5)}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nbagent.dbos_engine",
                "worker",
                "--db",
                pg_url,
                "--worker-id",
                f"w{n}",
                "--until-idle",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=90)
        assert w.returncode == 0, err[-3000:]
    lines = [ln.split() for ln in (tmp_path / "steps.log").read_text().splitlines()]
    executed = sorted((run, step) for run, step, _ in lines)
    expected = sorted((f"b{i}", s) for i in range(1, 5) for s in ("fetch", "think", "write"))
    assert executed == expected  # each step of each run exactly once
    rows = _sql(
        pg_url,
        "SELECT workflow_uuid, status, executor_id, output IS NOT NULL FROM dbos.workflow_status "
        "ORDER BY 1",
    )
    assert [(r[0], r[1]) for r in rows] == [(f"nbagent:b{i}", "SUCCESS") for i in range(1, 5)]
    assert {r[2] for r in rows} <= {"nbagent-worker:w1", "nbagent-worker:w2"}
    assert len({pid for _, _, pid in lines}) == 2  # both workers took part
    store = PgStore(pg_url)
    assert sorted(store.runs()) == ["b1", "b2", "b3", "b4"]
    for i in range(1, 5):
        assert store.counter(f"b{i}", "steps") == 3
        assert store.step_ids(f"b{i}") == ["fetch#1", "think#1", "write#1"]


# -- DBOS: a program written for the embedded engine (module-level run), failure and re-run ---

_PROGRAM = textwrap.dedent(
    """
    import os
    import nbagent

    run = nbagent.Run("prog", max_cost_usd=1.0)

    def mark(what):
        with open(os.environ["AGENT_LOG"], "a") as f:
            f.write(what + "\\n")

    @run.step("first")
    def first():
        mark("first")
        return 20

    @run.step("second")
    def second(x):
        mark("second")
        if os.path.exists(os.environ["AGENT_FAIL"]):
            raise RuntimeError("upstream is down")
        return x + 1

    def main():
        return second(first())
    """
)

_LAUNCHER = textwrap.dedent(
    """
    import sys
    from nbagent import dbos_engine
    engine = dbos_engine.launch(sys.argv[1])
    try:
        with dbos_engine.program_runs():
            program = dbos_engine.load_script(sys.argv[2])
        assert isinstance(program.run, dbos_engine.DbosRun)
        print("RESULT", engine.run_workflow(program.run.name, program.main, pass_run=False))
    finally:
        dbos_engine.shutdown()
    """
)


@pytest.mark.slow
def test_module_level_program_fails_then_reruns_only_the_failed_step(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    program = tmp_path / "program.py"
    program.write_text(_PROGRAM)
    launcher = tmp_path / "launch.py"
    launcher.write_text(_LAUNCHER)
    fail = tmp_path / "fail"
    fail.touch()
    env = {**_env(), "AGENT_LOG": str(tmp_path / "steps.log"), "AGENT_FAIL": str(fail)}
    cmd = [sys.executable, str(launcher), pg_url, str(program)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert first.returncode != 0 and "upstream is down" in first.stderr
    fail.unlink()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "RESULT 21" in second.stdout
    assert (tmp_path / "steps.log").read_text().split() == ["first", "second", "second"]
    rows = _sql(pg_url, "SELECT workflow_uuid, status FROM dbos.workflow_status ORDER BY 1")
    assert rows == [("nbagent:prog", "ERROR"), ("nbagent:prog:2", "SUCCESS")]
    store = PgStore(pg_url)
    assert store.get_run("prog") is not None and store.step_ids("prog") == ["first#1", "second#1"]
