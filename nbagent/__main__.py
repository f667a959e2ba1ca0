"""``python -m nbagent``: the same as the ``nbagent`` command."""

from __future__ import annotations

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
