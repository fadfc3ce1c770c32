"""Start local ranks with torch's elastic launcher, unless this process already is one.

``meshplan demo`` calls :func:`launch_local` when it is started by hand, and runs as a worker when a
launcher (``torchrun``, this module, a cluster scheduler's ``torchrun``) has set ``RANK`` / ``LOCAL_RANK``.
Multi-node runs use ``torchrun --nnodes N ... -m meshplan demo``: each worker then finds its rank in
the environment and never launches again.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping, Sequence

from ..core.errors import MeshplanError

#: Variables any torch launcher sets in its workers.
LAUNCHED_ENV = ("RANK", "LOCAL_RANK")


class LaunchError(MeshplanError, RuntimeError):
    """One or more launched ranks failed; ``exit_codes`` maps global rank -> exit code."""

    def __init__(self, message: str, exit_codes: Mapping[int, int]) -> None:
        super().__init__(message)
        self.exit_codes = dict(exit_codes)


def in_launched_job(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by a torch launcher (``RANK`` or ``LOCAL_RANK`` is set)."""
    env = os.environ if environ is None else environ
    return any(name in env for name in LAUNCHED_ENV)


def launch_local(nproc: int, args: Sequence[str], run_id: str | None = None) -> None:
    """Run ``python <args>`` on ``nproc`` local ranks (c10d rendezvous on a free 127.0.0.1 port).

    Worker output goes straight to this process's stdout/stderr. Returns when all ranks succeeded.

    Raises:
        LaunchError: a rank exited with a non-zero status (the others are stopped), naming the ranks.
    """
    # loaded on use: keeps start-up light
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise LaunchError(f"--nproc must be at least 1, got {nproc}.", {})
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id or f"meshplan-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
        local_addr="127.0.0.1",
    )
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        listing = ", ".join(f"rank {rank} exited with {code}" for rank, code in sorted(codes.items()))
        raise LaunchError(f"{listing} (their output is above).", codes) from None
