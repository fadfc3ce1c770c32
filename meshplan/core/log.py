"""Logging that speaks once, from rank 0, in distributed runs."""

from __future__ import annotations

import logging

import torch.distributed as dist


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``meshplan`` namespace."""
    return logging.getLogger(name if name.startswith("meshplan") else f"meshplan.{name}")


def is_rank_zero() -> bool:
    """True outside distributed runs and on global rank 0 inside them."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log_rank0(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """Log ``msg`` only on rank 0 (every rank computes the same message)."""
    if is_rank_zero():
        logger.log(level, msg, *args)
