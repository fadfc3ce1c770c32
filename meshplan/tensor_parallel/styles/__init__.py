"""meshplan's tensor-parallel styles and the protocol every style answers.

:mod:`.protocol` declares what validation, ``explain`` and the state code ask of a style (placements, module
types, checks, why a module stays whole) and :class:`~.protocol.Style`, the one base whose ``_apply`` torch calls;
:mod:`.traits` answers the protocol for torch's own styles and for any style object. The other modules hold the
styles by job: :mod:`.packed` (fused projections), :mod:`.embedding` (vocab-parallel embedding),
:mod:`.local_parameters` (modules computing on local shards), :mod:`.gradients` (reductions autograd sees),
:mod:`.module_state` (head counts, the rotary slice of latent attention), :mod:`.hidden_states` (activation
layouts) and :mod:`.composition` (kept-whole and chained styles).
"""
