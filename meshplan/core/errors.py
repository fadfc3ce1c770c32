"""One error hierarchy for every user-facing failure, public as :mod:`meshplan.errors`.

Each error also subclasses the built-in type it refines (``ValueError``, ``TypeError``, ``KeyError``,
``ImportError``), so generic handlers keep working. The NeMo AutoModel drop-in raises subclasses that
also derive from ``AssertionError`` where the reference asserted (:mod:`meshplan.compat.errors`).
"""

from __future__ import annotations


class MeshplanError(Exception):
    """Base class of every error meshplan raises on purpose."""


# --- plugins and registry -------------------------------------------------------------------------
class PluginLoadError(MeshplanError):
    """A plugin failed to import or raised inside a hook (fatal only with MESHPLAN_PLUGIN_ERRORS=raise)."""


class UnknownHookError(PluginLoadError):
    """A plugin implements a hook that meshplan does not specify (a misspelled hook name)."""


class HookWrapperError(PluginLoadError):
    """A plugin's hook wrapper broke pluggy's protocol: it must ``yield`` exactly once."""


class RegistrationError(MeshplanError, ValueError):
    """A registration is malformed or replaces an existing name without ``override=True``."""


class ConflictError(RegistrationError):
    """Two plugins claim the same name at the same precedence."""


class UnknownNameError(MeshplanError, KeyError):
    """A strategy, style or plan provider was asked for by a name nobody registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownStrategyError(UnknownNameError):
    """No strategy is registered under the requested name."""


class UnknownStyleError(UnknownNameError, ValueError):
    """No parallel style is registered under the requested name ("Unknown parallel style")."""


# --- options, imports, mesh ---------------------------------------------------------------------
class OptionsError(MeshplanError, TypeError):
    """Options passed to a strategy are unknown or have the wrong type."""


class ImportPathError(MeshplanError, ImportError):
    """A dotted path (``pkg.mod.Name`` or ``pkg.mod:Name``) could not be imported."""


class MeshError(MeshplanError, ValueError):
    """The device mesh lacks a required dimension or has an unusable shape."""


# --- plans --------------------------------------------------------------------------------------
class PlanError(MeshplanError, ValueError):
    """A tensor-parallel plan is malformed or cannot be applied to the model."""


class PlanNotFoundError(PlanError):
    """No plan was given and none is registered or declared for the model."""


class PlanSourceError(PlanError):
    """A ``tp_plan`` argument is neither a dict, a dotted path, nor a callable."""


class UnmatchedPlanKeyError(PlanError):
    """A plan key matches no module of the model (strict mode)."""


class TensorParallelSizeError(PlanError):
    """The TP size does not divide the model's attention heads or KV heads."""


class TiedParameterError(PlanError):
    """A plan would give parameters that the model shares (tied embeddings) different layouts."""


class StyleModuleTypeError(PlanError, TypeError):
    """A style was matched to a module type it cannot shard (e.g. ``colwise`` on GPT-2's ``Conv1D``)."""


class UntranslatableStyleError(PlanError):
    """A Hugging Face plan entry uses a style that torch DTensor styles cannot express safely."""


class SequenceParallelUnsupportedError(PlanError):
    """Sequence parallel was requested but no plan for it exists or can be derived for the model."""


# --- strategies ---------------------------------------------------------------------------------
class StrategyUnavailableError(MeshplanError, RuntimeError):
    """The strategy cannot run here: a package or a device type it needs is missing."""


class UnsupportedConfigurationError(MeshplanError, ValueError):
    """The requested combination of options cannot work (e.g. CPU offload on a CPU-only mesh)."""


class UnsupportedAxisError(UnsupportedConfigurationError):
    """A parallel axis (``ep_size`` > 1, a ``cp`` or ``pp`` mesh dim > 1) the strategy does not declare in its
    ``supports``."""


# --- mixture of experts -------------------------------------------------------------------------
class ExpertParallelError(MeshplanError, ValueError):
    """Expert parallelism cannot be laid out: ``ep_size`` does not divide the experts or the ranks it borrows,
    or the model has no experts for an EP plan to split."""


# --- context parallelism ---------------------------------------------------------------------------
class ContextParallelError(MeshplanError, ValueError):
    """Context parallelism cannot run with these inputs (base of the errors below)."""


class SequenceLengthError(ContextParallelError):
    """The sequence length does not split into ``2 x cp`` equal chunks (the load-balanced CP layout)."""


class UnsupportedAttentionError(ContextParallelError):
    """The model's attention cannot be wrapped for context parallelism (it names the class)."""


class UnsupportedSequenceMixerError(ContextParallelError):
    """The model mixes tokens with something context parallelism cannot split along the sequence (a convolution,
    a state-space or linear-attention recurrence); the error names each such module and its type."""


class UnshardedInputError(ContextParallelError):
    """A context-parallel model was called with a batch that ``shard_batch`` did not shard for its CP group."""


class CheckpointLayoutError(MeshplanError, ValueError):
    """A checkpoint records a layout of its parameters (packed parameters stored rank-major, by earlier meshplan
    versions) that does not fit the model loading it."""


# --- training loop ---------------------------------------------------------------------------------
class NonFiniteGradNormError(MeshplanError, RuntimeError):
    """The total gradient norm is ``nan`` or ``inf`` and clipping was asked to refuse it
    (``error_if_nonfinite=True``); a ``RuntimeError`` like torch's."""


# --- Hugging Face checkpoint folders --------------------------------------------------------------
class CheckpointError(MeshplanError, ValueError):
    """A Hugging Face checkpoint folder cannot be loaded into (or written from) the model; raised alike on every
    rank before any rank has loaded a tensor (base of the errors below)."""


class CheckpointKeyError(CheckpointError, KeyError):
    """The folder lacks tensors the model needs, or holds tensors the model has no place for (strict loading)."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointShapeError(CheckpointError):
    """A tensor of the folder (after the model type's conversions) has another shape than the model's parameter."""


class CheckpointFileError(CheckpointError):
    """The folder's files are missing, truncated or corrupt (an index naming a missing file, a bad header)."""


class CheckpointArchitectureError(CheckpointError):
    """The folder holds another architecture (``model_type``) than the model loading it."""


# --- pipeline parallelism --------------------------------------------------------------------------
class PipelineError(MeshplanError, ValueError):
    """Pipeline parallelism cannot run with these inputs (base of the errors below)."""


class PipelineSplitError(PipelineError):
    """The model cannot be split into the requested stages: no split is known for it (no ``base_model_pp_plan``,
    no ``pp`` plan provider), ``pp_split`` is out of range or unsorted, there are more stages than blocks, or tied
    parameters would land on different stages."""


class PipelineScheduleError(PipelineError):
    """The pipeline schedule is unknown or cannot use these microbatches / stages per rank."""


class MicrobatchError(PipelineError):
    """A batch does not split into the pipeline's microbatches."""


#: Every error class above (what :mod:`meshplan.errors` and ``meshplan`` export).
__all__ = sorted(name for name, value in globals().items()
                 if isinstance(value, type) and issubclass(value, MeshplanError))
