"""The trace as a pandas DataFrame, and its exports (JSONL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from ._store import Store


def trace_frame(store: Store, run: str | None = None) -> pd.DataFrame:
    """One row per LLM attempt, tool call and run event, oldest first."""
    import pandas as pd

    columns, rows = store.trace_rows(run)
    frame = pd.DataFrame.from_records(rows, columns=columns)
    frame["ts"] = pd.to_datetime(frame["ts"], unit="s", utc=True)
    frame["replayed"] = frame["replayed"].fillna(0).astype(bool)
    return frame.set_index("seq")


def to_jsonl(store: Store, run: str, path: str | Path) -> Path:
    """Write the run's trace as JSON Lines (one object per row); returns the path."""
    columns, rows = store.trace_rows(run)
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            record: dict[str, Any] = dict(zip(columns, row, strict=True))
            for key in ("request", "response", "detail"):
                if isinstance(record.get(key), str):
                    record[key] = json.loads(record[key])
            f.write(json.dumps(record, default=str) + "\n")
    return path
