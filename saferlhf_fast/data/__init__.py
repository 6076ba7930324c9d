"""Data: rows and the dataset registry (``NAME[:PROPORTION[:PATH]]``, with the reference implementation's names in
``upstream``), the prompt template, tokenized datasets and collators, the synthetic Safe RLHF world (``synthetic``)
and a real-prompt set (``real``)."""
from . import upstream  # noqa: F401 - registers the reference implementation's dataset names
from .datasets import (
    PreferenceCollator,
    PreferenceDataset,
    PromptOnlyCollator,
    PromptOnlyDataset,
    SafetyPreferenceCollator,
    SafetyPreferenceDataset,
    SupervisedCollator,
    SupervisedDataset,
    TokenizedDataset,
    left_pad,
    right_pad,
)
from .errors import DataError
from .sources import (
    ALIASES,
    REGISTRY,
    DatasetInfo,
    DatasetSpec,
    Record,
    load_records,
    parse_dataset_spec,
    read_file,
    register,
    resolve,
)
from .template import PROMPT_ASSISTANT, PROMPT_BEGIN, PROMPT_INPUT, PROMPT_USER, format_prompt
from .tokenizer import BUNDLED_TOKENIZER, load_tokenizer

__all__ = [
    "ALIASES", "BUNDLED_TOKENIZER", "DataError", "DatasetInfo", "DatasetSpec", "PROMPT_ASSISTANT", "PROMPT_BEGIN",
    "PROMPT_INPUT", "PROMPT_USER", "PreferenceCollator", "PreferenceDataset", "PromptOnlyCollator",
    "PromptOnlyDataset", "REGISTRY", "Record", "SafetyPreferenceCollator", "SafetyPreferenceDataset",
    "SupervisedCollator", "SupervisedDataset", "TokenizedDataset", "format_prompt", "left_pad", "load_records",
    "load_tokenizer", "parse_dataset_spec", "read_file", "register", "resolve", "right_pad",
]
