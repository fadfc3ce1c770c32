"""The Strategy contract that built-in and third-party strategies implement.

A strategy declares the parallel axes it supports (:attr:`Strategy.supports`, among :data:`AXES`; data
parallelism is its own job), and receives *finished* plans: the planning layer (:mod:`meshplan.planning`) has
resolved, matched and fitted them for every axis in use, once, into a :class:`~meshplan.core.plans.PlanSet`.

* ``prepare()`` refuses an axis the strategy does not declare (:class:`UnsupportedAxisError`) before any
  collective, then calls :meth:`Strategy.validate`, whose return value (what it computed) reaches
  :meth:`Strategy.parallelize` as ``validated``.
* The composition order (pipeline stages -> tensor parallel -> context parallel -> expert parallel ->
  activation checkpointing -> regional compile -> data-parallel wrapping) is written once, in
  :class:`meshplan.strategies.composition.ComposedStrategy`, which built-in strategies subclass.
* A strategy that declares no ``supports`` is a pre-contract one (``parallelize(model, roles, plan, options,
  ep_plan=None)``): it still runs for one release, through an adapter, with a ``DeprecationWarning``
  (:mod:`meshplan.planning.legacy`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .errors import OptionsError
from .naming import did_you_mean
from .options import check_option_types
from .plans import PlanSet
from .roles import MeshRoles, RoleDims, role_dims

#: The parallel axes a strategy may declare in :attr:`Strategy.supports`.
AXES = frozenset({"tp", "ep", "cp", "pp"})


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

    Subclasses set ``name``, ``supports`` (and optionally ``aliases``, ``description``, ``options_class``) and
    implement :meth:`parallelize` (or subclass :class:`~meshplan.strategies.composition.ComposedStrategy`, which
    implements it in the shared order and asks only for the data-parallel wrapping). :meth:`validate` and
    :meth:`unavailable_reason` run before any collective. Both receive the mesh as :class:`MeshRoles` (resolved
    from ``options.mesh_roles()``): ``roles.tp``, ``roles.data_parallel``, ``roles.cp``, ``roles.pp`` ... and
    ``roles.mesh`` for the whole mesh.

    ``supports`` is the set of axes among :data:`AXES` the strategy applies: ``"tp"`` (a ``tp`` dim > 1),
    ``"ep"`` (``ep_size`` > 1; options from :class:`~meshplan.core.axis_options.ExpertParallelOptions`),
    ``"cp"`` (a ``cp`` dim > 1; :class:`~meshplan.core.axis_options.ContextParallelOptions`), ``"pp"`` (a ``pp``
    dim > 1; :func:`~meshplan.core.roles.pipeline_role`). Any other axis in use is refused by ``prepare()``.
    """

    name: ClassVar[str]
    supports: ClassVar[frozenset[str]]
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

    def validate(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions) -> Any:
        """Raise a :class:`MeshplanError` for bad inputs; deterministic and collective-free. What it returns
        (e.g. a call it built) is handed to :meth:`parallelize` as ``validated``, so nothing is computed twice."""
        return None

    @abstractmethod
    def parallelize(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                    validated: Any) -> nn.Module:
        """Apply the strategy and return the model (parallelized in place where possible)."""


def declared_axes(strategy: Strategy) -> frozenset[str] | None:
    """The axes ``strategy`` declares, or ``None`` for a pre-contract strategy that declares none."""
    declared = getattr(type(strategy), "supports", None)
    return None if declared is None else frozenset(declared)
