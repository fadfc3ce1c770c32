"""The training loop around a parallelized model: gradient norms and clipping across meshes
(:mod:`~meshplan.training.grad_norm`), the token-weighted loss over data-parallel ranks
(:mod:`~meshplan.training.loss`) and per-block compilation (:mod:`~meshplan.training.compile`)."""
