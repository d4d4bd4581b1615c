"""Cursor pagination as OpenAI lists do it: ``after`` an id, ``has_more``, first/last ids."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from tasks.errors import InvalidRequest, quote
from tasks.store.safety import is_id

Row = TypeVar("Row")


def paginate(
    session: Session,
    model: type[Row],
    *,
    where: list[Any],
    scope: list[Any] | None = None,
    limit: int,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> tuple[list[Row], bool]:
    """A page of ``model`` rows matching ``where``; ``scope`` (its owner) also bounds the
    ``after`` anchor, so an id outside it is unknown here as everywhere else."""
    created = model.created_at  # type: ignore[attr-defined]
    ident = model.id  # type: ignore[attr-defined]
    scope = scope or []
    query = select(model).where(*scope, *where)
    if after:
        anchor = (
            session.scalars(select(model).where(ident == after, *scope)).first()
            if is_id(after)
            else None
        )
        if anchor is None:
            raise InvalidRequest(f"no object with id {quote(after)} to page after", param="after")
        a_created, a_id = anchor.created_at, anchor.id  # type: ignore[attr-defined]
        if order == "desc":
            query = query.where(or_(created < a_created, and_(created == a_created, ident < a_id)))
        else:
            query = query.where(or_(created > a_created, and_(created == a_created, ident > a_id)))
    if order == "desc":
        query = query.order_by(created.desc(), ident.desc())
    else:
        query = query.order_by(created.asc(), ident.asc())
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def page_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
