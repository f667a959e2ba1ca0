"""Security: a tampered store never runs code on load; secrets never reach disk; private dirs."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import diskcache
import pytest
from relkit import SCRIPT, SECRET_KEY, World, records, run_script

import nbagent
from nbagent import _store
from nbagent._errors import NbagentError, StoreError


class Bomb:
    """Creates a file when unpickled (by diskcache, pickle or anything else)."""

    def __init__(self, path: str, pad: int = 0) -> None:
        self.path, self.pad = path, pad

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def fresh_stores() -> None:
    with _store._open_lock:
        stores = list(_store._open_stores.values())
        _store._open_stores.clear()
    for s in stores:
        s.close()


def program(store: Path, fail: bool) -> dict[str, Any]:
    """Steps with a value, an LLM call (ledger) and an effect; ``b`` fails on the first run,
    leaving its ledger entry and effect record for the re-run to read."""
    fresh_stores()
    run = nbagent.Run("r", store=store)
    client = nbagent.simulated_client(run=run)

    @run.step("a")
    def a() -> dict[str, Any]:
        return {"big": "v" * 100_000, "small": 1}

    @run.step("b")
    def b() -> tuple[str, str]:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
        done = nbagent.once("charge", lambda key: f"charged {key}")
        if fail:
            raise RuntimeError("first run fails after the call and the effect")
        return str(reply.choices[0].message.content), str(done)

    with contextlib.redirect_stdout(io.StringIO()):
        return {"a": a()["small"], "b": b()}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store after a run whose step ``b`` failed mid-way (ledger and effect recorded)."""
    root = tmp_path_factory.mktemp("seeded")
    old = os.environ.get("NBAGENT_KEY_DIR")
    os.environ["NBAGENT_KEY_DIR"] = str(root / "keys")
    try:
        with pytest.raises(RuntimeError):
            program(root / "store", fail=True)
    finally:
        fresh_stores()
        if old is not None:
            os.environ["NBAGENT_KEY_DIR"] = old
    return root


def all_keys(store: Path) -> list[str]:
    """Every key of the store: diskcache's (identity, large values) and the records'."""
    with diskcache.Cache(str(store)) as c:
        keys = {str(k) for k in c.iterkeys()}
    return sorted(keys | {k for k, _ in records(store)})


def test_seeded_store_has_every_kind_of_key(seeded: Path) -> None:
    kinds = {k.split("/", 1)[0] for k in all_keys(seeded / "store")}
    assert {"blob", "step", "llm", "effect", "run", "ctr", "meta"} <= kinds, kinds


@pytest.mark.parametrize("big", [False, True], ids=["row", "file"])
def test_a_pickle_planted_under_any_key_never_runs(
    seeded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, big: bool
) -> None:
    monkeypatch.setenv("NBAGENT_KEY_DIR", str(tmp_path / "keys"))
    for key in all_keys(seeded / "store"):
        store = tmp_path / "s"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(tmp_path / "keys", ignore_errors=True)
        shutil.copytree(seeded / "store", store)
        shutil.copytree(seeded / "keys", tmp_path / "keys")
        boom = tmp_path / "boom"
        bomb: Any = Bomb(str(boom))
        if big:  # diskcache keeps a large pickle in a value file
            bomb = [bomb, "x" * 100_000]
        with diskcache.Cache(str(store)) as other:  # someone else writes into the store
            other.set(key, bomb)
        try:
            program(store, fail=False)
        except NbagentError as e:
            assert str(store) in str(e) or "store" in str(e), (key, e)
        assert not boom.exists(), f"a pickle planted under {key!r} ran code"


def test_a_raw_pickle_row_in_cache_db_never_runs(seeded: Path, tmp_path: Path) -> None:
    """A row written with sqlite directly: pickle mode (4) and pickled bytes as the value."""
    store = tmp_path / "s"
    shutil.copytree(seeded / "store", store)
    boom = tmp_path / "boom"
    con = sqlite3.connect(store / "cache.db")
    bomb = sqlite3.Binary(pickle.dumps(Bomb(str(boom))))
    con.execute("UPDATE Cache SET mode = 4, value = ? WHERE key = 'meta/format'", (bomb,))
    for key in ("step/r/a#1", "blob/r/a#1/(return)", "run/r"):  # records hold no pickles
        con.execute("UPDATE records SET value = ? WHERE key = ?", (bomb, key))
    con.commit()
    con.close()
    os.environ["NBAGENT_KEY_DIR"] = str(seeded / "keys")
    with pytest.raises(StoreError) as err:
        program(store, fail=False)
    assert "pickle" in str(err.value) and str(store) in str(err.value)
    assert not boom.exists()


@pytest.mark.parametrize("where", ["records", "diskcache"])
def test_an_unsigned_pickle_blob_never_runs(seeded: Path, tmp_path: Path, where: str) -> None:
    store = tmp_path / "s"
    shutil.copytree(seeded / "store", store)
    boom = tmp_path / "boom"
    payload = _store._BLOB_MAGIC + b"\0" * 44 + pickle.dumps(Bomb(str(boom)))
    con = sqlite3.connect(store / "cache.db")
    if where == "records":
        con.execute(  # a record is read before a file of the same key
            "INSERT OR REPLACE INTO records (key, value) VALUES ('blob/r/a#1/(return)', ?)",
            (payload,),
        )
    else:  # where large values are kept (read when no record has the key)
        con.execute("DELETE FROM records WHERE key = 'blob/r/a#1/(return)'")
    con.commit()
    con.close()
    if where == "diskcache":
        with diskcache.Cache(str(store)) as other:
            other.set("blob/r/a#1/(return)", payload)  # bytes: stored raw, no diskcache pickle
    os.environ["NBAGENT_KEY_DIR"] = str(seeded / "keys")
    with pytest.raises(StoreError, match="not signed"):
        program(store, fail=False)
    assert not boom.exists()


# -- secrets -------------------------------------------------------------------------------

AUTH_FAILURE = r"""
import os, httpx2, nbagent
from nbagent._client import openai_client
from nbagent._simulator import SimulatedLLM
run = nbagent.Run("auth")
client = openai_client(api_key=os.environ["REL_API_KEY"], base_url="https://sim.invalid/v1",
                       http_client=httpx2.Client(transport=SimulatedLLM(faults=["auth"])))
try:
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                   messages=[{"role": "user", "content": "key?"}])
except Exception as e:
    print(type(e).__name__)
"""


@pytest.mark.slow
def test_api_key_and_auth_headers_never_reach_disk(tmp_path: Path) -> None:
    world = World(tmp_path / "world")
    script = world.root / "agent.py"
    script.write_text(SCRIPT)
    env_key = {"REL_API_KEY": SECRET_KEY, "OPENAI_API_KEY": SECRET_KEY}
    os.environ.update(env_key)
    try:
        done = run_script(world, script)
        assert done.returncode == 0, done.stderr
        auth = world.root / "auth.py"
        auth.write_text(AUTH_FAILURE)
        failed = subprocess.run(
            [sys.executable, str(auth)], env=world.env(), capture_output=True, text=True
        )
        assert "AuthenticationError" in failed.stdout or "PermissionDenied" in failed.stdout, (
            failed.stdout + failed.stderr
        )
    finally:
        for k in env_key:
            os.environ.pop(k, None)
    needles = [SECRET_KEY.encode(), SECRET_KEY[3:].encode(), b"Bearer ", b"authorization"]
    files = [p for d in (world.store, world.keys) for p in d.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".db") for p in files)
    for path in files:
        data = path.read_bytes().lower()
        for needle in needles:
            assert needle.lower() not in data, f"{needle!r} found in {path}"


# -- private folders ------------------------------------------------------------------------


@pytest.mark.slow
def test_store_and_key_are_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    code = (
        "import os, nbagent; os.umask(0); run = nbagent.Run('u')\n"
        "@run.step('s')\ndef s(): return 1\ns()"
    )
    store, keys = tmp_path / "a" / "store", tmp_path / "b" / "keys"
    subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "NBAGENT_DIR": str(store), "NBAGENT_KEY_DIR": str(keys)},
        check=True,
        capture_output=True,
    )
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    (key,) = keys.iterdir()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
