"""How a batch call lines its per-prompt arguments up with its prompts (the driver's and the gateway's rule)."""

from __future__ import annotations

from typing import Any

from cluster.errors import InvalidRequestError


def aligned(value: Any, count: int, what: str) -> list[Any]:
    """One value for every prompt, or a list with one per prompt."""
    if isinstance(value, list):
        if len(value) != count:
            raise InvalidRequestError(f"{what} has {len(value)} entries for {count} prompts", param=what)
        return value
    return [value] * count
