"""The exception types NeMo AutoModel's parallelizer raised, for its drop-in :mod:`meshplan.parallelizer`.

The reference asserted where meshplan raises a typed error. meshplan's own API raises the plain typed errors
(:mod:`meshplan.errors`); the drop-in raises these subclasses of them, which also derive from
``AssertionError``, so ``except AssertionError`` handlers written against the reference keep working and
``except meshplan.errors.TensorParallelSizeError`` catches both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from ..core.errors import (
    MeshplanError,
    PlanNotFoundError,
    SequenceParallelUnsupportedError,
    StrategyUnavailableError,
    TensorParallelSizeError,
    UnknownStyleError,
)

F = TypeVar("F", bound=Callable[..., Any])


class NemoPlanNotFoundError(PlanNotFoundError, AssertionError):
    """:class:`PlanNotFoundError` where the reference asserted ("Hugging Face tp plan is not supported")."""


class NemoTensorParallelSizeError(TensorParallelSizeError, AssertionError):
    """:class:`TensorParallelSizeError` where the reference asserted ("... must be divisible by TP size")."""


class NemoSequenceParallelUnsupportedError(SequenceParallelUnsupportedError, AssertionError):
    """:class:`SequenceParallelUnsupportedError` where the reference asserted ("sequence_parallel is not
    supported in HF tp plan")."""


class NemoStrategyUnavailableError(StrategyUnavailableError, AssertionError):
    """:class:`StrategyUnavailableError` where the reference asserted ("nvFSDP is not installed")."""


class StyleTypeError(UnknownStyleError, AssertionError):
    """A style given as something other than a string (the reference asserted)."""


#: meshplan's error -> the drop-in's subclass of it, in the order they are tried.
REFERENCE_TYPES: dict[type[MeshplanError], type[MeshplanError]] = {
    PlanNotFoundError: NemoPlanNotFoundError,
    TensorParallelSizeError: NemoTensorParallelSizeError,
    SequenceParallelUnsupportedError: NemoSequenceParallelUnsupportedError,
    StrategyUnavailableError: NemoStrategyUnavailableError,
}


def as_reference_error(error: MeshplanError) -> MeshplanError:
    """``error`` as the drop-in's subclass of its type (same message and attributes); ``error`` itself when the
    reference raised nothing narrower for it."""
    if isinstance(error, AssertionError):
        return error
    for meshplan_type, reference_type in REFERENCE_TYPES.items():
        if isinstance(error, meshplan_type):
            translated = reference_type(*error.args)
            translated.__dict__.update(error.__dict__)
            return translated
    return error


def raises_reference_errors(function: F) -> F:
    """Decorate a drop-in function so that the errors it raises carry the reference's built-in types."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except MeshplanError as error:
            translated = as_reference_error(error)
            if translated is error:
                raise
            raise translated.with_traceback(error.__traceback__) from error.__cause__

    return wrapper  # type: ignore[return-value]
