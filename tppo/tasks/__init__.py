"""Tasks: the embedded chain-subtraction task, dataset loaders, and the prompt stream."""

from tppo.tasks.arithmetic import ArithTask
from tppo.tasks.base import Example, PromptSource, epoch_stream, first_distinct, format_prompt, prompt_text
from tppo.tasks.chain import ChainTask
from tppo.tasks.datasets import DatasetError, LoadedDataset, TaskData, holdout, load_examples, load_hf_examples, load_task_data, normalize_answer

__all__ = [
    "ArithTask",
    "ChainTask",
    "DatasetError",
    "Example",
    "LoadedDataset",
    "PromptSource",
    "TaskData",
    "epoch_stream",
    "first_distinct",
    "format_prompt",
    "prompt_text",
    "holdout",
    "load_examples",
    "load_hf_examples",
    "load_task_data",
    "normalize_answer",
]
