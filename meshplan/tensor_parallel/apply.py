"""Apply a validated plan with torch DTensor tensor parallelism, keeping shared parameters shared."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..core.errors import TiedParameterError
from .plan import ResolvedPlan

#: ``(module fqn, parameter name)`` of one owner of a shared parameter.
Owner = tuple[str, str]


def shared_parameters(model: nn.Module) -> list[list[Owner]]:
    """Groups of owners that hold the *same* parameter object (e.g. a tied ``lm_head`` and embedding)."""
    owners: dict[int, list[Owner]] = {}
    seen_modules: set[tuple[int, str]] = set()
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            if (id(module), name) not in seen_modules:  # one module reachable by two paths is not a tie
                seen_modules.add((id(module), name))
                owners.setdefault(id(param), []).append((fqn, name))
    return [group for group in owners.values() if len(group) > 1]


def _layout(param: nn.Parameter) -> str:
    from torch.distributed.tensor import DTensor  # heavy: imported on use, not at start-up

    if isinstance(param, DTensor):
        return f"{param.placements} on a mesh of {param.device_mesh.size()}"
    return "unsharded"


def tied_layout_error(layouts: dict[str, str]) -> TiedParameterError:
    """The error for tied parameters that a plan lays out differently (``{parameter: layout}``)."""
    listing = ", ".join(f"{name}: {layout}" for name, layout in layouts.items())
    return TiedParameterError(
        f"The TP plan splits tied parameters differently ({listing}); a tied lm_head is never sharded apart "
        "from its embedding. Shard them the same way (vocab-parallel embedding `embedding_rowwise` with a "
        "`colwise_rep` lm_head), leave all of them unsharded, or untie them (config.tie_word_embeddings=False)."
    )


def retie(model: nn.Module, groups: list[list[Owner]]) -> None:
    """Make each group share one parameter again; :class:`TiedParameterError` if their layouts differ.

    Styles replace a module's parameters with new DTensor parameters, which breaks ties. Identical layouts
    (both unsharded, or both vocab-sharded ``Shard(0)``) can be shared again; anything else cannot.
    """
    for group in groups:
        params = [getattr(model.get_submodule(fqn), name) for fqn, name in group]
        if all(p is params[0] for p in params):
            continue
        layouts = {f"{fqn}.{name}" if fqn else name: _layout(p) for (fqn, name), p in zip(group, params)}
        if len(set(layouts.values())) > 1 or len({tuple(p.shape) for p in params}) > 1:
            raise tied_layout_error(layouts)
        for fqn, name in group[1:]:
            model.get_submodule(fqn).register_parameter(name, params[0])


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: ResolvedPlan) -> nn.Module:
    """Apply each style to the modules its key matched, in plan order (matching is not redone).

    Parameters shared between modules before (tied embeddings) are shared again afterwards.
    """
    from torch.distributed.tensor.parallel import parallelize_module  # loaded on use: keeps start-up light

    groups = shared_parameters(model)
    for key, style in plan.styles.items():
        for fqn in plan.matches.get(key, ()):
            parallelize_module(model.get_submodule(fqn), tp_mesh, style)
    retie(model, groups)
    return model
