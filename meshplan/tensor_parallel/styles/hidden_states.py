"""Styles that move activations between layouts (or copy them) and leave parameters alone."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement

from ...core.errors import PlanError
from .protocol import Style


def redistributed(value: torch.Tensor, mesh: DeviceMesh, layouts: tuple[Placement, ...],
                  desired: tuple[Placement, ...], local: bool) -> torch.Tensor:
    """``value`` (a plain tensor is taken to be in ``layouts``) redistributed to ``desired``; its local tensor if
    ``local``."""
    if not isinstance(value, DTensor):
        value = DTensor.from_local(value, mesh, layouts, run_check=False)
    if value.placements != desired:
        value = value.redistribute(placements=desired)
    return value.to_local() if local else value


class PrepareHiddenStates(Style):
    """Redistribute the hidden-states input (positional argument ``position``, else keyword ``argument``) from
    ``input_layout`` to ``desired_layout``; a plain tensor input is taken to be in ``input_layout``, a non-tensor
    (``None``) is passed on as is. Another input works the same way: name it and give its position. torch's
    ``PrepareModuleInput`` needs the exact call shape."""

    def __init__(self, input_layout: Placement, desired_layout: Placement, *, argument: str = "hidden_states",
                 position: int = 0, use_local_output: bool = False) -> None:
        super().__init__()
        self.input_layouts = (input_layout,)
        self.desired_input_layouts = (desired_layout,)
        self.argument = argument
        self.position = position
        self.use_local_output = use_local_output

    def _convert(self, value: Any, mesh: DeviceMesh) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return redistributed(value, mesh, self.input_layouts, self.desired_input_layouts, self.use_local_output)

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def prepare(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            index = self.position
            if len(args) > index:
                return (*args[:index], self._convert(args[index], device_mesh), *args[index + 1:]), kwargs
            if self.argument in kwargs:
                return args, {**kwargs, self.argument: self._convert(kwargs[self.argument], device_mesh)}
            raise PlanError(f"{type(mod).__name__} was called without positional input {index} or "
                            f"{self.argument}=...; {type(self).__name__} cannot find its {self.argument}.")

        # first of the module's pre-hooks: ``input_layout`` is the input as the caller passes it, before any other
        # style on the module (a mixer's, which takes the gathered sequence) prepares it
        module.register_forward_pre_hook(prepare, with_kwargs=True, prepend=True)
        return module

    def __repr__(self) -> str:
        where = "" if (self.argument, self.position) == ("hidden_states", 0) else \
            f"{self.argument} (position {self.position}), "
        return (f"{type(self).__name__}({where}{self.input_layouts[0]} -> {self.desired_input_layouts[0]}, "
                f"use_local_output={self.use_local_output})")


class PrepareHiddenStatesOutput(Style):
    """Redistribute a module's output (the tensor, or the first element of a tuple) from ``output_layout`` to
    ``desired_layout``; a plain tensor output is taken to be in ``output_layout``."""

    def __init__(self, output_layout: Placement, desired_layout: Placement, *, use_local_output: bool = False
                 ) -> None:
        super().__init__()
        self.output_layouts = (output_layout,)
        self.desired_output_layouts = (desired_layout,)
        self.use_local_output = use_local_output

    def _convert(self, value: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        return redistributed(value, mesh, self.output_layouts, self.desired_output_layouts, self.use_local_output)

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def prepare(mod: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return self._convert(output, device_mesh)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (self._convert(output[0], device_mesh), *output[1:])
            raise PlanError(f"{type(mod).__name__} returned {type(output).__name__}, not a tensor or a tuple "
                            f"starting with one; {type(self).__name__} cannot find its hidden states.")

        module.register_forward_hook(prepare)
        return module

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.output_layouts[0]} -> {self.desired_output_layouts[0]}, "
                f"use_local_output={self.use_local_output})")


class OwnedOutput(Style):
    """The module returns a copy of its tensor output: a row-wise projection's output is a view made inside a
    custom autograd function (``to_local``), which a caller may not update in place (Llama 4's MoE does
    ``shared_out.add_(routed_out)``, as transformers' own TP allows)."""

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def copy(mod: nn.Module, args: tuple, output: Any) -> Any:
            return output.clone() if isinstance(output, torch.Tensor) else output

        module.register_forward_hook(copy)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
