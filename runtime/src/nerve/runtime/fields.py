"""Pydantic field types that refuse what is not a token, naming what it was meant to be.

Apart from `nerve.runtime.subjects` (which the lean edge process imports) because they need pydantic.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

from pydantic import AfterValidator

from nerve.runtime.subjects import check_token

__all__ = ["DeviceId", "Metric", "Token"]

DeviceId = Annotated[str, AfterValidator(partial(check_token, what="device id"))]
Metric = Annotated[str, AfterValidator(partial(check_token, what="metric"))]
Token = Annotated[str, AfterValidator(partial(check_token, what="name"))]
