"""Exchanges as Parquet rows (Apache Arrow): one row per exchange with typed columns, so recordings from
many VMs can be queried together with DuckDB, Polars or Spark.

Rows are written in row groups of `ROW_GROUP` as the exchanges finish, so memory stays flat whatever the
recording's size.  pyarrow is an optional dependency (`pip install 'fsinspect[parquet]'`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import privfile
from ..analysis import Exchange
from . import format as fmt

ROW_GROUP = 65_536


class ParquetUnavailable(Exception):
    """pyarrow is not installed."""


def _pa() -> Any:
    try:
        import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
        import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise ParquetUnavailable("--format parquet needs pyarrow: pip install 'fsinspect[parquet]'") from None
    return pa, pq


def schema() -> Any:
    pa, _ = _pa()
    return pa.schema([
        pa.field("n", pa.int64(), nullable=False),  # the exchange number every fsinspect command shows
        pa.field("time", pa.timestamp("ns", tz="UTC")),  # the request's capture time (the reply's if orphan)
        pa.field("queue", pa.uint16(), nullable=False),
        pa.field("opcode", pa.dictionary(pa.int16(), pa.string()), nullable=False),  # LOOKUP, ..., ? if unknown
        pa.field("opcode_num", pa.int32(), nullable=False),  # -1 for a reply without its request
        pa.field("unique", pa.uint64(), nullable=False),
        pa.field("nodeid", pa.uint64()),
        pa.field("name", pa.string()),  # the file name a LOOKUP, CREATE, MKDIR, ... names (RENAME: the old one)
        pa.field("error", pa.dictionary(pa.int16(), pa.string())),  # errno name; null: success or no reply
        pa.field("errno", pa.int32()),  # 0 success; null: no reply
        pa.field("latency_ns", pa.int64()),
        pa.field("request_len", pa.int64(), nullable=False),  # bytes on the wire, before any snapping
        pa.field("reply_len", pa.int64(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),  # INIT epoch
        pa.field("flags", pa.list_(pa.string()), nullable=False),  # snapped, submount, held, injected, ...
        pa.field("lints", pa.list_(pa.string()), nullable=False),
    ])


def _row_flags(ex: Exchange, record_flags: int) -> list[str]:
    out = [name for bit, name in fmt.DEBUGGER_FLAG_NAMES if record_flags & bit]
    if ex.snapped:
        out.append("snapped")
    if ex.submount:
        out.append("submount")
    if ex.decode_error:
        out.append("decode-error")
    return out


class ParquetSink:
    """Collects finished exchanges and writes them to `dest` in row groups; `close()` makes the file."""

    def __init__(self, dest: str | os.PathLike[str], *, mode: int) -> None:
        pa, pq = _pa()
        self._pa = pa
        self.dest = Path(dest)
        self._tmp = self.dest.with_name(f".{self.dest.name}.tmp{os.getpid()}")
        self._schema = schema()
        fd = privfile.create(self._tmp, mode)
        self._file = os.fdopen(fd, "wb")
        self._writer = pq.ParquetWriter(self._file, self._schema, compression="zstd")
        self._cols: dict[str, list[Any]] = {f.name: [] for f in self._schema}
        self.rows = 0

    def add(self, ex: Exchange, record_flags: int = 0) -> None:
        c = self._cols
        known = ex.opcode >= 0
        names = ex.names() if known else []
        c["n"].append(ex.n or ex.index + 1)
        c["time"].append(ex.ts_ns or None)
        c["queue"].append(ex.queue)
        c["opcode"].append(ex.opname)
        c["opcode_num"].append(ex.opcode)
        c["unique"].append(ex.unique)
        c["nodeid"].append(ex.nodeid if known else None)
        c["name"].append(names[0].decode("utf-8", "backslashreplace") if names else None)
        c["error"].append(ex.errname if ex.error else None)
        c["errno"].append(ex.error)
        c["latency_ns"].append(ex.latency_ns)
        c["request_len"].append(ex.req_len)
        c["reply_len"].append(ex.reply_len)
        c["epoch"].append(ex.epoch)
        c["flags"].append(_row_flags(ex, record_flags))
        c["lints"].append(list(ex.lints))
        if len(c["n"]) >= ROW_GROUP:
            self._flush()

    def extend(self, exchanges: Iterable[Exchange]) -> None:
        for ex in exchanges:
            self.add(ex)

    def _flush(self) -> None:
        if not self._cols["n"]:
            return
        table = self._pa.Table.from_pydict(self._cols, schema=self._schema)
        self._writer.write_table(table, row_group_size=ROW_GROUP)
        self.rows += table.num_rows
        for v in self._cols.values():
            v.clear()

    def close(self) -> None:
        """Write what is left and put the file in place (never seen half written)."""
        try:
            self._flush()
            self._writer.close()
            self._file.close()
            os.replace(self._tmp, self.dest)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)
