"""The SQL of the hot paths, one module per database: `dialect()` picks the one in use.

jobs.services and jobs.dispatch decide what happens to jobs and hosts; the
dialect modules only say it in their database's SQL (PostgreSQL: CTEs,
`FOR UPDATE SKIP LOCKED`, array and JSON parameters; SQLite: one writer at a
time under BEGIN IMMEDIATE, JSON parameters through json_each). Each
function runs inside the caller's transaction.
"""

from __future__ import annotations

import json
from datetime import datetime
from types import ModuleType
from typing import Any

from django.db import connection
from django.db.models import Field, Model


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def dialect() -> ModuleType:
    """The module holding this connection's SQL (jobs.sql.postgresql or jobs.sql.sqlite)."""
    if is_postgres():
        from . import postgresql

        return postgresql
    from . import sqlite

    return sqlite


def claim_host_filters(jobs: str, of_kinds: str, *, alone: bool, kinds: list[str] | None) -> tuple[str, str]:
    """The claim's two optional conditions on a host `h`, the same on both databases.

    `of_kinds` is the dialect's "this job's kind is one of the session's"
    condition with an `{alias}` slot ("" when the session takes every kind).
    Returns (only hosts with a queued suspect, when `alone`; only hosts with
    a queued job of the session's kinds, when it has kinds: a host none of
    whose jobs it takes is not its to lock; job_kind_queue makes that one
    probe per kind).
    """
    only_suspects = (
        f"AND h.id IN (SELECT s.host_id FROM {jobs} AS s WHERE s.status = 'queued' AND s.run_alone "
        f"{of_kinds.format(alias='s')})"
        if alone
        else ""
    )
    has_kinds = (
        ""
        if kinds is None
        else f"AND EXISTS (SELECT 1 FROM {jobs} AS k WHERE k.host_id = h.id AND k.status = 'queued' "
        f"{of_kinds.format(alias='k')})"
    )
    return only_suspects, has_kinds


def table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def column(model: type[Model], name: str) -> Field:
    """A model's concrete field (get_field may also return relations, which these names never are)."""
    field = model._meta.get_field(name)
    assert isinstance(field, Field), name
    return field


def db_value(model: type[Model], field_name: str, value: Any) -> Any:
    """Adapt a Python value for a raw SQL parameter of <model>.<field_name>."""
    return column(model, field_name).get_db_prep_value(value, connection)


def db_time(value: datetime | None) -> Any:
    """A datetime as a raw SQL parameter (the form every DateTimeField of the project takes)."""
    from jobs.models import Job

    return None if value is None else db_value(Job, "started_at", value)


def json_value(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value
