"""Request bodies and query strings -> validated models, with every bad field named.

TrainRequest validates its ``config`` overrides as a whole and reports them under ``config``;
a client needs the key itself (``config.epochz``), so the overrides are validated here against
TrainConfig first and their errors re-rooted under ``config.``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ingress.errors import MalformedBody, RequestInvalid
from ingress.models import FieldProblem
from schemas.jobs import JobState, TrainRequest
from schemas.redact import redact_credentials
from schemas.training import TrainConfig, is_union_branch

ROOT = "(root)"


def parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        # Strict JSON: NaN, Infinity and numbers beyond a float are not JSON, and a store writes
        # them as null, which leaves a view that no longer reads back (GET and list would fail).
        doc = json.loads(raw, parse_constant=_not_json, parse_float=_finite_float)
    except RecursionError:
        raise MalformedBody(f"{what} is nested too deeply to read") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise MalformedBody(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RequestInvalid(what, [FieldProblem(field=ROOT, message=f"must be a JSON object, got {_json_type(doc)}",
                                                 type="model_type")])
    return doc


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def parse_train_request(raw: bytes) -> TrainRequest:
    """Raises MalformedBody (not JSON) or RequestInvalid (names every bad field)."""
    body = parse_json_object(raw, "train request")
    problems: list[FieldProblem] = []
    overrides = body.get("config")
    if isinstance(overrides, dict):
        try:
            TrainConfig.model_validate(overrides)
        except ValidationError as exc:
            problems += problems_of(exc, prefix=("config",))
    per_key, problems = problems, []
    try:
        return TrainRequest.model_validate(body)
    except ValidationError as exc:
        for problem in problems_of(exc):
            # The whole-config error says less than the per-key problems: those go in its place.
            if problem.field == "config" and per_key:
                problems += per_key
            else:
                problems.append(problem)
    raise RequestInvalid("train request", problems)


class ListQuery(BaseModel):
    """GET /train query string; names match the parameters so errors name them."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    limit: int = Field(50, ge=1, le=1000)
    cursor: str | None = Field(None, min_length=1)
    status: JobState | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _state(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return JobState(value)
            except ValueError:
                names = ", ".join(s.value for s in JobState)
                raise ValueError(f"unknown state {value!r}; use one of {names}") from None
        return value


def parse_list_query(query: dict[str, str], default_limit: int) -> ListQuery:
    # An empty cursor is the first page (a loop that starts with none); an empty limit or status
    # is a mistake (an unset variable, say) and is refused, never read as "no filter".
    values: dict[str, Any] = {"limit": default_limit,
                              **{k: v for k, v in query.items() if not (k == "cursor" and v == "")}}
    try:
        return ListQuery.model_validate(values)
    except ValidationError as exc:
        raise RequestInvalid("query", problems_of(exc)) from None


def problems_of(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[FieldProblem]:
    out: dict[str, FieldProblem] = {}
    for err in exc.errors():
        # A union's alternatives (``int | 'auto'``) are one field: their messages are joined.
        loc = (*prefix, *(str(p) for p in err["loc"] if not is_union_branch(p)))
        field = ".".join(loc) or ROOT
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "is required"
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
            if "input" in err and err["type"] not in ("model_type", "dict_type"):
                message += f" (got {redact_credentials(_short(err['input']))})"
        first = out.get(field)
        out[field] = (FieldProblem(field=field, message=message, type=err["type"]) if first is None else
                      FieldProblem(field=field, message=f"{first.message} or {message}", type=first.type))
    return list(out.values())


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)
