"""Pipeline parallelism: a ``pp`` mesh dim splits a decoder into stages run by torch's schedules.

* :mod:`.split`: where a model splits (its ``pp`` plan) and which blocks each stage gets;
* :mod:`.stages`: a stage module (the model pruned to one stage, original parameter names);
* :mod:`.schedules`: torch's schedules by name, their rules, stage placement, theoretical bubble;
* :mod:`.model`: :class:`PipelineModel` (``step`` / ``eval_step``);
* :mod:`.apply`: plan (validate, collective-free) and build.

Nothing here imports ``torch.distributed.pipelining`` until a pipeline is built.
"""

from .apply import PipelinePlan, build_pipeline, parallelize_pipeline, plan_pipeline
from .model import PipelineModel
from .options import PipelineParallelOptions
from .schedules import bubble_fraction, schedule_names

__all__ = ["PipelineModel", "PipelineParallelOptions", "PipelinePlan", "bubble_fraction", "build_pipeline",
           "parallelize_pipeline", "plan_pipeline", "schedule_names"]
