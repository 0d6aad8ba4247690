"""Request bodies: the pydantic models that validate them also document them (api._openapi)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refusing it here keeps it a 422 instead of a 500.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[StrictStr, AfterValidator(_no_nul)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Signup(_Body):
    email: Text = Field(max_length=254)
    password: Text = Field(min_length=8, max_length=128)
    name: Text = Field(min_length=1, max_length=100)


class Signin(_Body):
    email: Text = Field(max_length=254)
    password: Text = Field(max_length=128)


class RefreshBody(_Body):
    refresh_token: Text = Field(min_length=1, max_length=200)


class Amount(_Body):
    amount: StrictInt = Field(gt=0)


class TransferBody(Amount):
    to: Text = Field(min_length=1, max_length=254)
    note: Text | None = Field(default=None, max_length=280)


class RearmBody(_Body):
    """An operator's re-arm of intents flagged needs_attention: which kinds, how many at most."""

    kinds: list[Literal["deposit", "withdrawal", "transfer"]] = Field(
        default=["deposit", "withdrawal", "transfer"], min_length=1, max_length=3
    )
    limit: StrictInt = Field(default=100, ge=1, le=1000)
