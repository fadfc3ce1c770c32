"""``PipelineModel``: this rank's pipeline stages and the schedule that trains them.

``pipe.step(input_ids=..., labels=..., **batch)`` splits the (local) batch into microbatches, runs the
schedule's forward and backward and returns the loss: the mean over the batch's scored tokens, the same value on
every rank of the pipeline (summed from the stage that computes it). ``pipe.eval_step(...)`` runs forward only.
``pipe.parameters()`` are this rank's stages' parameters, for the optimizer.

Stage modules keep the original model's parameter names (``pipe.stage_modules``); ``pipe.named_parameters()``
prefixes them with ``stages.<i>.``, and :meth:`PipelineModel.original_name` strips that prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

from ..core import torch_private
from ..core.errors import MicrobatchError, PipelineError, PipelineScheduleError
from .plan import PipelinePlan
from .router_loss import experts, router_loss
from .stages import stage_info

#: Labels with this value are not scored (transformers' convention).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PipelineLoss:
    """How the last stage scores a microbatch: ``fn(output, target, num_items)`` returns the microbatch's share
    of the batch loss (its token-summed loss divided by the batch's scored tokens), so the shares add up to
    the whole batch's mean."""

    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    counts_tokens: bool  # whether targets are token labels (num_items = scored tokens) or per-sample targets


def causal_lm_loss(model: nn.Module) -> PipelineLoss:
    """transformers' own loss of ``model`` (shifted next-token cross entropy), summed over the microbatch's scored
    tokens and divided by the batch's; the targets are the already shifted labels (``shift_labels``)."""
    vocab_size = model.config.get_text_config().vocab_size
    loss_function = model.loss_function

    def fn(logits: torch.Tensor, shift_labels: torch.Tensor, num_items: torch.Tensor) -> torch.Tensor:
        return loss_function(logits=logits, labels=None, shift_labels=shift_labels, vocab_size=vocab_size,
                             num_items_in_batch=num_items)

    return PipelineLoss(fn, counts_tokens=True)


def with_router_loss(loss: PipelineLoss, model: nn.Module, microbatches: int) -> PipelineLoss:
    """``loss`` of the last stage's ``(logits, router sums)`` plus ``router_aux_loss_coef`` times the microbatch's
    router loss, averaged over the microbatches (the model's ``loss + coef * aux_loss``)."""
    num_experts, _, coef = experts(model)

    def fn(output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, num_items: torch.Tensor) -> torch.Tensor:
        logits, sums = output
        return loss.fn(logits, target, num_items) + coef * router_loss(sums, num_experts) / microbatches

    return PipelineLoss(fn, loss.counts_tokens)


def mean_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], microbatches: int) -> PipelineLoss:
    """A user's per-microbatch mean loss ``loss_fn(output, target)``, averaged over the microbatches."""
    return PipelineLoss(lambda output, target, _: loss_fn(output, target) / microbatches, counts_tokens=False)


class PipelineModel(nn.Module):
    """This rank's pipeline stages (``stages``: the stage modules, parallelized) and their schedule."""

    def __init__(self, stage_modules: Sequence[nn.Module], pp_mesh: DeviceMesh, plan: PipelinePlan,
                 loss: PipelineLoss) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stage_modules)
        self.schedule: Any = None  # torch's schedule over this rank's stages (set by build_pipeline)
        self.pp_mesh = pp_mesh
        self.pipeline_plan = plan
        self.microbatches = plan.microbatches
        self.loss = loss
        self._num_items = torch.zeros(())
        self._schedule_mode: bool | None = None  # backward of the last schedule call (None: not run yet)

    # --- what other code needs ------------------------------------------------------------------------------
    @property
    def stage_modules(self) -> list[nn.Module]:
        """This rank's stage modules; their parameter names are the original model's."""
        return list(self.stages)

    @property
    def stage_indices(self) -> list[int]:
        return [stage_info(m).index for m in self.stages]

    @property
    def holds_last_stage(self) -> bool:
        return any(stage_info(m).is_last for m in self.stages)

    @property
    def config(self) -> Any:
        """The wrapped model's ``config`` (Hugging Face models), else ``None``."""
        return getattr(self.stages[0], "config", None)

    @staticmethod
    def original_name(name: str) -> str:
        """``stages.<i>.model.layers.3.mlp...`` -> ``model.layers.3.mlp...``."""
        head, _, rest = name.partition(".")
        if head != "stages" or not rest:
            return name
        return rest.partition(".")[2]

    # --- training and evaluation ----------------------------------------------------------------------------
    def step(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
             backward: bool = True, **batch: Any) -> torch.Tensor:
        """Run the schedule over the batch (forward + backward unless ``backward=False``) and return the loss, the
        same on every pipeline rank. ``input_ids`` is the first stage's input, ``labels`` (or ``shift_labels`` /
        ``target``) the last stage's targets; tensors in ``batch`` (``attention_mask``, ``position_ids``, ...) reach
        every stage, split into microbatches along dim 0. ``num_items_in_batch`` (from
        :func:`meshplan.shard_batch`) overrides the count of scored tokens."""
        if not backward and self.pipeline_plan.schedule.v_shape:
            raise PipelineScheduleError(
                f"eval_step cannot run the {self.pipeline_plan.schedule.name} schedule: torch's V schedules run "
                "their backward actions in eval too, which fails on one rank while the others wait. Evaluate with "
                "another schedule (load the checkpoint into a pipeline with pp_schedule='1F1B') or without pp.")
        inputs = input_ids if input_ids is not None else batch.pop("inputs", None)
        target, num_items = self._target(labels, batch)
        if inputs is None or target is None:
            raise MicrobatchError("PipelineModel.step needs the first stage's input (input_ids=...) and targets "
                                  "(labels=... or shift_labels=...) on every pipeline rank.")
        size = inputs.shape[0]
        if size % self.microbatches:
            raise MicrobatchError(f"A batch of {size} does not split into {self.microbatches} microbatches "
                                  "(pp_microbatches): use a multiple of it.")
        kwargs = {k: _per_sample(v, size, self.microbatches, k) for k, v in batch.items()}
        self._num_items = num_items
        losses: list[torch.Tensor] = []
        # torch's schedule re-runs its shape inference (a real forward, and backward when training) on its first
        # call and whenever step and eval_step alternate, then drops every FSDP gradient: gradients of earlier steps
        # are set aside around such a call and added back
        kept = _set_aside_gradients(self) if backward is not self._schedule_mode else []
        self._schedule_mode = backward
        try:
            if backward:
                self.schedule.step(inputs, target=target, losses=losses, **kwargs)
            else:
                with torch.no_grad():
                    self.schedule.eval(inputs, target=target, losses=losses, **kwargs)
        finally:
            for param, grad in kept:
                param.grad = grad if param.grad is None else grad.add_(param.grad)
        return self._broadcast_loss(losses)

    def eval_step(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  **batch: Any) -> torch.Tensor:
        """:meth:`step` without backward; gradients and parameters stay as they are. Not for the V schedules
        (``ZBVZeroBubble``, ``DualPipeV``): :class:`PipelineScheduleError`."""
        return self.step(input_ids, labels, backward=False, **batch)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise PipelineError("A PipelineModel runs whole batches through its schedule: call pipe.step(input_ids=..., "
                            "labels=...) for training or pipe.eval_step(...) for evaluation.")

    def _target(self, labels: torch.Tensor | None, batch: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        shift_labels = batch.pop("shift_labels", None)
        given = batch.pop("num_items_in_batch", None)
        target = batch.pop("target", None)
        if self.loss.counts_tokens:
            if shift_labels is None and labels is not None:
                shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            target = shift_labels
            count = (shift_labels != IGNORE_INDEX).sum() if shift_labels is not None else torch.zeros(())
        else:
            target = labels if target is None else target
            count = torch.ones(())
        return target, torch.as_tensor(given if given is not None else count)

    def compute_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function (last stage only); ``output`` is the last stage's output (a tensor, or
        ``(logits, router sums)`` with a router auxiliary loss)."""
        first = output[0] if isinstance(output, tuple) else output
        return self.loss.fn(output, target, self._num_items.to(first.device))

    def _broadcast_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        device = self._device()
        total = torch.stack([t.detach().float() for t in losses]).sum().to(device) if losses else torch.zeros(
            (), device=device)
        dist.all_reduce(total, group=self.pp_mesh.get_group())  # only the last stage's rank holds losses
        return total

    def _device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))


def _set_aside_gradients(module: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Every parameter's gradient of ``module``, taken off the parameter; FSDP modules are resharded first, so that
    the sharded parameters holding FSDP's gradients are the registered ones (a root FSDP module stays unsharded
    after a forward without backward)."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
    kept = [(param, param.grad) for param in module.parameters() if param.grad is not None]
    for param, _ in kept:
        param.grad = None
    return kept


def _per_sample(value: Any, size: int, microbatches: int, name: str) -> Any:
    """Tensors with one row for the whole batch (``position_ids`` ``[1, seq]``) are expanded to one per sample, so
    they split into microbatches like the inputs. torch splits the tensors of pytree nodes too (a CP
    ``SequenceShard``: each microbatch gets the padding and documents of its rows); any other object reaches every
    microbatch whole, so one that carries per-row tensors is refused: :class:`MicrobatchError`."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == 1 and size > 1:
            return value.expand(size, *value.shape[1:])
        return value
    if microbatches > 1 and dataclasses.is_dataclass(value) and torch_private.pytree_leaf(value):
        rows = [f.name for f in dataclasses.fields(value) if isinstance(getattr(value, f.name), torch.Tensor)
                and getattr(value, f.name).dim() > 0 and getattr(value, f.name).shape[0] == size]
        if rows:
            raise MicrobatchError(
                f"Batch entry {name!r} ({type(value).__name__}) holds per-row tensors {rows} that the pipeline cannot "
                "split into microbatches: pass them as separate tensors, register the class as a pytree node "
                "(torch.utils._pytree.register_dataclass), or use pp_microbatches=1 (GPipe).")
    return value
