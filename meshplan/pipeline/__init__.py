"""Pipeline parallelism: a ``pp`` mesh dim splits a decoder into stages run by torch's schedules.

* :mod:`.split`: where a model splits (its ``pp`` plan) and which blocks each stage gets;
* :mod:`.stages`: a stage module (the model pruned to one stage, original parameter names);
* :mod:`.schedules`: torch's schedules by name, their rules, stage placement, theoretical bubble;
* :mod:`.model`: :class:`PipelineModel` (``step`` / ``eval_step``);
* :mod:`.apply`: plan (validate, collective-free) and build.

A strategy declares ``"pp"`` in ``supports`` and takes :class:`~.options.PipelineParallelOptions`; the shared
composition order (:class:`meshplan.strategies.composition.ComposedStrategy`) then splits the model first and runs
every other step once per stage. Nothing here imports ``torch.distributed.pipelining`` until a pipeline is built.
"""
