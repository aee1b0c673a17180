"""The kinds of work a study is made of, one type each (`base.Task`: fields, `key`,
`dependencies`, `resources`, `cost`, `cached`, `run`). `study.plan` builds them from the
settings; the executors run them."""

from lorasum.study.tasks.accuracy import AccuracyTask
from lorasum.study.tasks.base import KINDS, AdapterTask, Resources, Task, job_cost
from lorasum.study.tasks.compose import CalibrateTask, ComposeTask, VariantTask
from lorasum.study.tasks.evaluate import EvalTask, ScoredTask, cached_eval, eval_key
from lorasum.study.tasks.fit import FitTask, FittedTask, MergeAwareTask, fitted_task_type
from lorasum.study.tasks.gradients import DomainGradientsTask
from lorasum.study.tasks.predictors import DataPredictorsTask, PredictorsTask
from lorasum.study.tasks.routes import (
    ROUTE_TASKS,
    ArrowRouteTask,
    GaussianRouteTask,
    NearestRouteTask,
    RouteTask,
)
from lorasum.study.tasks.train import TrainTask

__all__ = [
    "KINDS",
    "ROUTE_TASKS",
    "AccuracyTask",
    "AdapterTask",
    "ArrowRouteTask",
    "CalibrateTask",
    "ComposeTask",
    "DataPredictorsTask",
    "DomainGradientsTask",
    "EvalTask",
    "FitTask",
    "FittedTask",
    "MergeAwareTask",
    "GaussianRouteTask",
    "NearestRouteTask",
    "PredictorsTask",
    "Resources",
    "RouteTask",
    "ScoredTask",
    "Task",
    "TrainTask",
    "VariantTask",
    "cached_eval",
    "eval_key",
    "fitted_task_type",
    "job_cost",
]
