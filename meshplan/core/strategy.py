"""The Strategy contract that built-in and third-party strategies implement.

A strategy receives a *finished* plan: the dispatcher has already resolved, normalized and validated
it. The strategy composes the core helpers in a fixed order (tensor/sequence parallel ->
activation checkpointing -> data-parallel wrapping) and never re-resolves plans.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..tensor_parallel.plan import ResolvedPlan
from .errors import OptionsError
from .naming import did_you_mean
from .options import check_option_types
from .roles import MeshRoles, RoleDims, role_dims


@dataclass
class StrategyOptions:
    """Options every strategy understands. Subclass (as a dataclass) to add your own.

    Attributes:
        tp_mesh_name: mesh dimension used for tensor parallelism (absent or size 1 = no TP).
        sequence_parallel: ask the plan provider for its sequence-parallel variant.
        strict: every plan key must match a module (``False``: one warning on rank 0 instead).
    """

    tp_mesh_name: str = "tp"
    sequence_parallel: bool = False
    strict: bool = True

    def mesh_roles(self) -> dict[str, RoleDims]:
        """The parallel roles the strategy supports and the mesh dims each may use (first present wins).

        Every mesh dim larger than 1 must fall in one of them (see :func:`meshplan.core.roles.resolve_roles`).
        The base knows ``tp`` by its option and the data-parallel roles by their canonical dim names;
        subclasses name their own (and add ``cp`` when they support context parallelism).
        """
        return {
            "tp": role_dims("tp_mesh_name", self.tp_mesh_name),
            "dp_replicate": role_dims(None, "dp_replicate"),
            "dp_shard": role_dims(None, "dp_shard_cp", "dp_shard", "dp"),
        }

    def report(self) -> dict[str, str]:
        """The options as reports show them (``repr`` of each value); override to show what a default means."""
        return {f.name: repr(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class OptionInfo:
    """One option as shown by ``meshplan strategies``."""

    name: str
    type: str
    default: Any


class Strategy(ABC):
    """Base class of parallel strategies. Register a subclass through ``meshplan_register_strategies``.

    Subclasses set ``name`` (and optionally ``aliases``, ``description``, ``options_class``) and implement
    :meth:`parallelize`. :meth:`validate` and :meth:`unavailable_reason` run before any collective.
    Both receive the mesh as :class:`MeshRoles` (resolved from ``options.mesh_roles()``): ``roles.tp``,
    ``roles.data_parallel``, ``roles.cp`` ... and ``roles.mesh`` for the whole mesh.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    options_class: ClassVar[type[StrategyOptions]] = StrategyOptions

    def make_options(self, options: Mapping[str, Any]) -> StrategyOptions:
        """Build the typed options object; unknown names, and values that do not have the field's declared
        type (:mod:`meshplan.core.options`), raise :class:`OptionsError`."""
        valid = {f.name for f in dataclasses.fields(self.options_class)}
        unknown = sorted(set(options) - valid)
        if unknown:
            listing = ", ".join(f"{o.name}={o.default!r}" for o in self.describe_options())
            hint = did_you_mean(unknown[0], valid)
            raise OptionsError(
                f"Unknown option(s) {unknown} for strategy {self.name!r}.{hint} Valid options: {listing}."
            )
        built = self.options_class(**options)
        check_option_types(built, self.name)
        return built

    @classmethod
    def describe_options(cls) -> list[OptionInfo]:
        """The options with their declared types and defaults. Annotations are shown as written, never
        evaluated, so listing a strategy does not import the libraries its option types come from."""
        infos = []
        for f in dataclasses.fields(cls.options_class):
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            infos.append(OptionInfo(f.name, type_name.replace("typing.", ""), default))
        return infos

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        """``None`` when the strategy can run here (on ``device_type`` if given), else why not."""
        return None

    def validate(
        self, model: nn.Module, roles: MeshRoles, plan: ResolvedPlan | None, options: StrategyOptions,
        ep_plan: ResolvedPlan | None = None,
    ) -> None:
        """Raise a :class:`MeshplanError` for bad inputs. Must be deterministic and collective-free.

        ``ep_plan`` (expert parallelism) is passed only to strategies whose options have ``ep_size`` > 1;
        their :meth:`parallelize` receives it as the same keyword."""

    @abstractmethod
    def parallelize(
        self, model: nn.Module, roles: MeshRoles, plan: ResolvedPlan | None, options: StrategyOptions
    ) -> nn.Module:
        """Apply the strategy and return the model (parallelized in place where possible)."""
