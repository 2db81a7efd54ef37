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
