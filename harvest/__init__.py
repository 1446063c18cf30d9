"""Harvesting LoRA adapters: tasks, the built-in zoo, metrics, training and evaluation.

Library code only (no database, no CLI). Importing this package does not import torch.
"""

from harvest.metrics import METRICS, extract_choice, extract_number, normalize, score
from harvest.tasks import Example, Task, TaskError, TaskInfo, load_task_file, make_task, write_task_file
from harvest.zoo import export_task, list_zoo, load_zoo_task, zoo_names
from harvest.train import HarvestConfig, HarvestError, HarvestResult, harvest, save_adapter
from harvest.evaluate import EvalResult, Prediction, evaluate

__all__ = [
    "METRICS", "extract_choice", "extract_number", "normalize", "score",
    "Example", "Task", "TaskError", "TaskInfo", "load_task_file", "make_task", "write_task_file",
    "export_task", "list_zoo", "load_zoo_task", "zoo_names",
    "HarvestConfig", "HarvestError", "HarvestResult", "harvest", "save_adapter",
    "EvalResult", "Prediction", "evaluate",
]
