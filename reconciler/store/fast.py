"""The hot statements of a deployment's writes, run through the driver on SQLite.

SQLAlchemy's execution of an already compiled statement (cache key, execution context,
parameter and result processing in general form, the result object) costs ~50-60 us on
this machine; the statement itself, through the sqlite3 driver, ~5-15 us. A no-op
deployment runs about fifteen of them (issue 12). `Fast` keeps the statement defined with
SQLAlchemy (the tables in models.py, the statement beside its caller), compiles it once
per dialect, and on SQLite runs the compiled SQL on the transaction's own driver
connection, binding and converting values with the processors of the columns' own types
(so values are stored and read exactly as SQLAlchemy stores and reads them; a test
compares). PostgreSQL keeps `Connection.execute` (the same statement: one definition).

Only statements whose parameters are all scalars, or lists fixed in the statement
(``status.in_(CONSTANTS)``), qualify: the expansion of such a list is taken once.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler

#: Off: every statement through SQLAlchemy (a test compares what both paths store).
DRIVER = True


class FastRow(Mapping[str, Any]):
    """A returned row: by column name (``row["id"]``, ``row.id``) and as ``row._mapping``,
    as the callers read SQLAlchemy's rows."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: Mapping[str, int], values: Sequence[Any]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[self._index[key]]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[self._index[key]]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def _mapping(self) -> FastRow:
        return self

    @property
    def _tuple(self) -> tuple[Any, ...]:
        """The values, in the statement's column order."""
        return tuple(self._values)


class _Compiled:
    """One statement compiled for SQLite: its SQL, how to bind, how to read."""

    __slots__ = ("binders", "columns", "fixed", "index", "names", "readers", "sql")

    def __init__(self, statement: Any, conn: Connection, params: Mapping[str, Any]) -> None:
        dialect = conn.dialect
        compiled = statement.compile(dialect=dialect, column_keys=list(params))
        assert isinstance(compiled, SQLCompiler)
        if compiled.insert_prefetch or compiled.update_prefetch:  # Python-side defaults
            raise TypeError(f"{statement}: give every column a value to precompile it")
        for bind in compiled.binds.values():
            if bind.expanding and (bind.value is None or bind.callable is not None):
                raise TypeError(f"{bind.key}: a list bound per call cannot be precompiled")
        full: MutableMapping[str, Any] = compiled.construct_params(dict(params))
        processors: Mapping[str, Any] = compiled._bind_processors
        if compiled.post_compile_params or compiled.literal_execute_params:
            state = compiled._process_parameters_for_postcompile(full)
            sql, names, values = state.statement, state.positiontup, state.parameters
            processors = {**processors, **state.processors}
        else:
            sql, names, values = compiled.string, compiled.positiontup, full
        self.sql = sql
        self.names = tuple(names or ())
        # Values the statement itself holds (``IN (...)`` constants, literals): taken now.
        self.fixed = {name: values[name] for name in self.names if name not in params}
        self.binders = tuple(processors.get(name) for name in self.names)
        columns = compiled._result_columns
        self.columns = tuple(column[0] for column in columns)
        self.readers = tuple(
            column[3]._cached_result_processor(dialect, None) for column in columns
        )
        self.index = {name: i for i, name in enumerate(self.columns)}

    def bind(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        fixed = self.fixed
        out = []
        for name, binder in zip(self.names, self.binders, strict=True):
            value = params[name] if name not in fixed else fixed[name]
            out.append(value if binder is None or value is None else binder(value))
        return tuple(out)

    def row(self, values: Sequence[Any]) -> FastRow:
        converted = [
            value if reader is None or value is None else reader(value)
            for reader, value in zip(self.readers, values, strict=True)
        ]
        return FastRow(self.index, converted)


class Fast:
    """A statement that runs through the driver on SQLite (see the module)."""

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        # By the parameters' names (as SQLAlchemy's own cache: they decide an INSERT's
        # columns), in the order given.
        self._compiled: dict[tuple[str, ...], _Compiled] = {}
        self._lock = threading.Lock()

    def _sqlite(self, conn: Connection, params: Mapping[str, Any]) -> _Compiled:
        key = tuple(params)
        compiled = self._compiled.get(key)
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get(key)
                if compiled is None:
                    compiled = self._compiled[key] = _Compiled(self.statement, conn, params)
        return compiled

    def execute(self, conn: Connection, params: Mapping[str, Any] | None = None) -> int:
        """Run it (an INSERT/UPDATE without RETURNING); the rows it changed."""
        params = params or {}
        if not (DRIVER and conn.dialect.name == "sqlite"):
            return int(conn.execute(self.statement, dict(params)).rowcount)
        compiled = self._sqlite(conn, params)
        values = compiled.bind(params)
        cursor = _driver(conn).cursor()
        try:
            cursor.execute(compiled.sql, values)
            return int(cursor.rowcount)
        except sqlite3.Error as exc:
            raise _wrapped(conn, compiled.sql, values, exc) from exc
        finally:
            cursor.close()

    def execute_many(self, conn: Connection, params: Sequence[Mapping[str, Any]]) -> None:
        """Run it once per parameter set (an INSERT of several rows)."""
        if not (DRIVER and conn.dialect.name == "sqlite"):
            conn.execute(self.statement, [dict(p) for p in params])
            return
        compiled = self._sqlite(conn, params[0])
        rows = [compiled.bind(p) for p in params]
        try:
            _driver(conn).executemany(compiled.sql, rows)
        except sqlite3.Error as exc:
            raise _wrapped(conn, compiled.sql, rows, exc) from exc

    def rows(self, conn: Connection, params: Mapping[str, Any] | None = None) -> list[FastRow]:
        """Run it and read what it returns (a SELECT, or RETURNING)."""
        params = params or {}
        if not (DRIVER and conn.dialect.name == "sqlite"):
            result = conn.execute(self.statement, dict(params))
            keys = {name: i for i, name in enumerate(result.keys())}
            return [FastRow(keys, tuple(row)) for row in result]
        compiled = self._sqlite(conn, params)
        values = compiled.bind(params)
        cursor = _driver(conn).cursor()
        try:
            cursor.execute(compiled.sql, values)
            fetched = cursor.fetchall()
        except sqlite3.Error as exc:
            raise _wrapped(conn, compiled.sql, values, exc) from exc
        finally:
            cursor.close()
        return [compiled.row(values) for values in fetched]

    def one_or_none(
        self, conn: Connection, params: Mapping[str, Any] | None = None
    ) -> FastRow | None:
        found = self.rows(conn, params)
        if len(found) > 1:
            raise AssertionError(f"more than one row from {self.statement}")
        return found[0] if found else None


def _driver(conn: Connection) -> Any:
    """The transaction's driver connection (its BEGIN went there already: db.py). A
    connection not in a transaction yet (a reader's) begins one, as SQLAlchemy's own
    first statement would: the reads of a block share one view."""
    if not conn.in_transaction():
        conn.begin()
    return conn.connection.driver_connection


def _wrapped(conn: Connection, sql: str, params: Any, exc: sqlite3.Error) -> Exception:
    """The driver's error as SQLAlchemy raises it (`is_transient` and the callers' own
    ``except IntegrityError`` read it the same)."""
    return DBAPIError.instance(sql, params, exc, sqlite3.Error, dialect=conn.dialect, ismulti=None)
