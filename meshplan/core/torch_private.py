"""Every private torch API meshplan uses, in one place, each behind a feature probe.

torch offers no public way yet to flatten, split or join device-mesh dims, to read FSDP2's parameter groups, to
run DTensor ring attention, or to wrap a module for activation checkpointing the way FSDP2 expects; meshplan
uses the private APIs below for that. :data:`PRIVATE_APIS` names each one; :func:`resolve` imports it and
raises :class:`TorchPrivateAPIError` (naming the API and the torch version) when a torch release moved or
removed it, and ``tests/core/test_torch_private.py`` has a test per API that fails on such a release. Call sites
import from here, never from the private module; ``mesh._layout``-style attributes are read only here, too.

Heavy modules are imported on first use (PEP 562), so importing this module costs nothing beyond
``torch.distributed.device_mesh``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.nn import Module

from .errors import MeshplanError

#: meshplan's name for a private torch API -> ``module:attribute path`` where torch keeps it.
PRIVATE_APIS: dict[str, str] = {
    # device-mesh layout operations (mesh roles, expert-parallel meshes, Megatron-FSDP's dp x cp dim)
    "flatten_mesh": "torch.distributed.device_mesh:DeviceMesh._flatten",
    "unflatten_mesh": "torch.distributed.device_mesh:DeviceMesh._unflatten",
    "concatenate_meshes": "torch.distributed.device_mesh:DeviceMesh._concatenate",
    "root_mesh": "torch.distributed.device_mesh:DeviceMesh._get_root_mesh",
    "MeshLayout": "torch.distributed._mesh_layout:_MeshLayout",  # explain: every rank's process groups
    # explain: computed once per mesh layout in a fake world of any size (see meshplan.dryrun.large_world)
    "mesh_tensor": "torch.distributed.device_mesh:DeviceMesh.mesh",
    "mesh_coordinate": "torch.distributed.device_mesh:DeviceMesh._compute_coordinate_on_dim",
    "fsdp_chunk_with_empty": "torch.distributed.fsdp._fully_shard._fsdp_param:_chunk_with_empty",
    # placements and FSDP2 state (explain, checkpoints)
    "StridedShard": "torch.distributed.tensor.placement_types:_StridedShard",
    "compute_local_shape_and_global_offset":  # tests: the local shard of a DTensor at any mesh coordinate
        "torch.distributed.tensor._utils:_compute_local_shape_and_global_offset",
    "local_shape_and_global_offset":  # checkpoints: this rank's local shard of a DTensor
        "torch.distributed.tensor._utils:compute_local_shape_and_global_offset",
    "LocalShardsWrapper": "torch.distributed.tensor._shards_wrapper:LocalShardsWrapper",  # DCP's multi-chunk tensor
    "FSDPMeshInfo": "torch.distributed.fsdp._fully_shard._fsdp_common:FSDPMeshInfo",  # tests: shard_placement_fn
    "ShardPlacementResult": "torch.distributed.fsdp._fully_shard._fsdp_common:ShardPlacementResult",
    "get_fsdp_state": "torch.distributed.fsdp:FSDPModule._get_fsdp_state",
    # data-parallel wrappers and activation checkpointing
    "replicate": "torch.distributed._composable.replicate:replicate",
    "replicate_with_fsdp": "torch.distributed._composable.replicate_with_fsdp:replicate",
    "checkpoint_wrapper": "torch.distributed.algorithms._checkpoint.checkpoint_wrapper:checkpoint_wrapper",
    "CheckpointWrapper": "torch.distributed.algorithms._checkpoint.checkpoint_wrapper:CheckpointWrapper",
    # expert-parallel token dispatch
    "all_to_all_single_autograd": "torch.distributed._functional_collectives:all_to_all_single_autograd",
    "AsyncCollectiveTensor": "torch.distributed._functional_collectives:AsyncCollectiveTensor",
    # batch entries that hold per-row tensors (a CP SequenceShard): split into pipeline microbatches like tensors
    "register_pytree_node": "torch.utils._pytree:register_pytree_node",
    "pytree_leaf": "torch.utils._pytree:tree_is_leaf",
    # context parallelism: torch's ring attention
    "context_parallel_options": "torch.distributed.tensor.experimental._attention:_cp_options",
    "enable_context_parallel_dispatcher":
        "torch.distributed.tensor.experimental._attention:_enable_context_parallel_dispatcher",
}

#: Where the two data-parallel ``replicate`` functions live (the ``ddp`` strategy imports them by module).
DDP_REPLICATE_MODULE = PRIVATE_APIS["replicate"].split(":")[0]
TP_REPLICATE_MODULE = PRIVATE_APIS["replicate_with_fsdp"].split(":")[0]


class TorchPrivateAPIError(MeshplanError, RuntimeError):
    """A private torch API meshplan relies on is missing or changed in this torch release."""


@functools.cache
def resolve(name: str) -> Any:
    """The private torch object :data:`PRIVATE_APIS` names ``name``; :class:`TorchPrivateAPIError` if this torch
    lacks it. The feature probe of each API."""
    module_name, _, path = PRIVATE_APIS[name].partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for attribute in path.split("."):
            found = getattr(found, attribute)
    except (ImportError, AttributeError) as exc:
        raise TorchPrivateAPIError(
            f"meshplan needs {module_name}.{path} ({name}), which torch {torch.__version__} lacks: {exc}. "
            "Use a torch release meshplan supports (see pyproject.toml)."
        ) from exc
    return found


def __getattr__(name: str) -> Any:
    """Classes and functions used as they are (``from meshplan.core.torch_private import checkpoint_wrapper``)."""
    if name in PRIVATE_APIS:
        return resolve(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def replaced(name: str, replacement: Any) -> Iterator[None]:
    """Inside the block, the private API ``name`` is ``replacement`` where torch looks it up (its module or
    class attribute); restored on exit. :class:`TorchPrivateAPIError` if this torch lacks it."""
    resolve(name)
    module_name, _, path = PRIVATE_APIS[name].partition(":")
    *owners, attribute = path.split(".")
    owner: Any = importlib.import_module(module_name)
    for part in owners:
        owner = getattr(owner, part)
    original = vars(owner)[attribute]  # the raw attribute (a property stays a property)
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


# ----------------------------------------------------------------------------------------- device meshes
def flatten(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """``mesh`` (all its dims) as one dim called ``name``, recorded on the root mesh (collective-free)."""
    return resolve("flatten_mesh")(mesh, name)


def unflatten(mesh: DeviceMesh, dim: int, sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """``mesh`` with dim ``dim`` split into dims ``names`` of ``sizes`` (collective-free)."""
    return resolve("unflatten_mesh")(mesh, dim, sizes, names)


def concatenate(meshes: Sequence[DeviceMesh]) -> DeviceMesh:
    """One mesh whose dims are the dims of ``meshes`` (disjoint sub-meshes of one root), in order."""
    return resolve("concatenate_meshes")(list(meshes))


def flattened_dim(mesh: DeviceMesh, name: str) -> DeviceMesh | None:
    """The flattened dim ``name`` created on ``mesh`` (a root mesh, by :func:`flatten` or the caller), else
    ``None`` (also for a sub-mesh: torch looks flattened dims up on the root only).

    torch deprecates slicing a flattened dim from the root (``mesh["dp_shard_cp"]``) and asks callers to keep the
    flattened mesh; the root records it, and this reads that record.
    """
    root = resolve("root_mesh")(mesh)
    if root is not mesh:
        return None
    flattened = getattr(root, "_flatten_mapping", None)
    if not isinstance(flattened, dict):
        raise TorchPrivateAPIError(f"torch {torch.__version__}'s DeviceMesh keeps no _flatten_mapping of its "
                                   "flattened dims.")
    return flattened.get(name)


def dim_rank_groups(mesh: DeviceMesh) -> list[torch.Tensor]:
    """Per mesh dim, every process group of that dim as a row of global ranks, without a process group per
    rank (what ``explain`` needs for fake worlds of thousands of ranks)."""
    layout = resolve("MeshLayout")
    try:
        return [layout([axis]).remap_to_tensor(mesh._rank_map) for axis in mesh._layout]
    except AttributeError as exc:
        raise TorchPrivateAPIError(f"torch {torch.__version__}'s DeviceMesh has no _layout / _rank_map: {exc}") from exc


def mesh_identity(mesh: DeviceMesh) -> tuple[Any, torch.Tensor, int | None]:
    """(the mesh's layout, its root's rank-map tensor, the rank it was built for): what ``mesh.mesh`` (with the
    global rank) and the rank's coordinate depend on. The layout is hashable; every mesh derived from one root
    shares the rank-map tensor."""
    try:
        return mesh._layout, mesh._rank_map, getattr(mesh, "_rank", None)
    except AttributeError as exc:
        raise TorchPrivateAPIError(f"torch {torch.__version__}'s DeviceMesh has no _layout / _rank_map: {exc}") from exc


# ------------------------------------------------------------------------------------------ FSDP2 state
def fsdp_state(unit: Module) -> Any | None:
    """FSDP2's state of a ``fully_shard``-ed module (``FSDPModule._get_fsdp_state()``); ``None`` for another
    module or when torch hides it."""
    get_state = getattr(unit, "_get_fsdp_state", None)
    if get_state is None:
        return None
    try:
        return get_state()
    except (AttributeError, AssertionError):  # torch asserts on a module whose state is gone
        return None


def fsdp_param_groups(unit: Module) -> list[Any]:
    """The unit's FSDP parameter groups (several when ``shard_placement_fn`` puts parameters on other meshes);
    empty when unknown or none. torch < 2.12 keeps a single group under the singular name."""
    state = fsdp_state(unit)
    groups = getattr(state, "_fsdp_param_groups", None)
    if isinstance(groups, (list, tuple)):
        return list(groups)
    single = getattr(state, "_fsdp_param_group", None)
    return [] if single is None else [single]


def fsdp_mixed_precision(unit: Module) -> Any | None:
    """The ``MixedPrecisionPolicy`` the unit was sharded with, or ``None`` when torch hides it."""
    return getattr(fsdp_state(unit), "_mp_policy", None)


# ----------------------------------------------------------------------------------- context parallelism
def enable_ring_attention(load_balance: bool) -> None:
    """Route DTensor SDPA to torch's ring attention, process-wide (``load_balance``: the head-tail layout)."""
    resolve("context_parallel_options").enable_load_balance = load_balance
    resolve("enable_context_parallel_dispatcher")()
