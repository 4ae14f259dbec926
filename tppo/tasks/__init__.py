"""Tasks: the embedded chain-subtraction task, dataset loaders, and the prompt stream."""

from tppo.tasks.base import Example, PromptSource, epoch_stream, format_prompt
from tppo.tasks.chain import ChainTask
from tppo.tasks.datasets import DatasetError, LoadedDataset, load_examples, load_hf_examples, normalize_answer

__all__ = [
    "ChainTask",
    "DatasetError",
    "Example",
    "LoadedDataset",
    "PromptSource",
    "epoch_stream",
    "format_prompt",
    "load_examples",
    "load_hf_examples",
    "normalize_answer",
]
