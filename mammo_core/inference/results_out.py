"""Write `predict` results to a table file as they arrive: CSV or Parquet, one row per input.

Rows are the JSON objects `Prediction.to_json` gives (the same for the local and the Ray engine);
every file has the same columns whatever the rows hold, so error rows and ensemble-only fields
fit. CSV rows are flushed one by one; Parquet rows are written in row groups of `PARQUET_ROWS`,
so an archive of any size streams through bounded memory.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

#: Output columns, in order. `warnings` is a JSON list; the interval is split in two numbers.
COLUMNS: tuple[str, ...] = ("path", "probability", "label", "threshold", "model", "in_distribution", "warnings",
                            "probability_low", "probability_high", "ood_score", "error")
FORMATS: tuple[str, ...] = (".csv", ".parquet")
PARQUET_ROWS = 1024


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A `Prediction.to_json` object as a row with exactly `COLUMNS`."""
    interval = row.get("probability_interval") or (None, None)
    warnings = row.get("warnings")
    return {"path": row.get("path"), "probability": row.get("probability"), "label": row.get("label"),
            "threshold": row.get("threshold"), "model": row.get("model"), "in_distribution": row.get("in_distribution"),
            "warnings": json.dumps(warnings) if warnings is not None else None,
            "probability_low": interval[0], "probability_high": interval[1], "ood_score": row.get("ood_score"),
            "error": row.get("error")}


class ResultsFile:
    """A results table opened for writing: `add(row)` per result, then `close()` (or use as a context manager).

    Raises ValueError when the file name ends in neither .csv nor .parquet.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in FORMATS:
            raise ValueError(f"--out {self.path}: the file name must end in .csv or .parquet")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self._pending: list[dict[str, Any]] = []
        self._parquet = None
        if self.suffix == ".csv":
            self._fh = open(self.path, "w", newline="", encoding="utf-8")
            self._csv = csv.DictWriter(self._fh, fieldnames=COLUMNS, lineterminator="\n")
            self._csv.writeheader()

    def add(self, row: dict[str, Any]) -> None:
        flat = flat_row(row)
        self.rows += 1
        if self.suffix == ".csv":
            self._csv.writerow(flat)
            self._fh.flush()
            return
        self._pending.append(flat)
        if len(self._pending) >= PARQUET_ROWS:
            self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("path", pa.string()), ("probability", pa.float64()), ("label", pa.string()),
                            ("threshold", pa.float64()), ("model", pa.string()), ("in_distribution", pa.bool_()),
                            ("warnings", pa.string()), ("probability_low", pa.float64()),
                            ("probability_high", pa.float64()), ("ood_score", pa.float64()), ("error", pa.string())])
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.path, schema)
        if self._pending:
            self._parquet.write_table(pa.Table.from_pylist(self._pending, schema=schema))
            self._pending = []

    def close(self) -> None:
        if self.suffix == ".csv":
            self._fh.close()
        else:
            self._flush_parquet()  # also creates an empty file with the schema when there were no rows
            self._parquet.close()

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
