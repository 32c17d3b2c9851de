"""Run a CLI command's coroutine and turn the errors a user can fix into one-line messages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import typer

T = TypeVar("T")
# Exception type -> what to tell the user about it; the first matching entry wins.
Explanations = Mapping[type[BaseException], Callable[[Any], str]]


def fail(message: str) -> typer.Exit:
    """Print `error: message` to stderr and return the Exit(1) for the caller to raise."""
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(1)


def run_command(coroutine: Coroutine[Any, Any, T], explanations: Explanations) -> T:
    """Run a command; an error listed in `explanations` becomes its one-line message."""
    try:
        return asyncio.run(coroutine)
    except tuple(explanations) as exc:
        explain = next(e for kind, e in explanations.items() if isinstance(exc, kind))
        raise fail(explain(exc)) from None
