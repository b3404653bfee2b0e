"""Data: tasks (E2E, WebNLG 2017, DART, synthetic, corpus), prompt encoding, batching."""

from lora_repro.data.batching import bucket_length, collate, length_grouped_batches
from lora_repro.data.corpus import load_corpus
from lora_repro.data.encoding import (
    IGNORE_INDEX,
    encode_dataset,
    encode_example,
    encode_prompts,
    prompt_text,
)
from lora_repro.data.records import Example, TaskData, TestSource
from lora_repro.data.tasks import OFFLINE_E2E, TASKS, load_task

__all__ = [
    "IGNORE_INDEX", "OFFLINE_E2E", "TASKS", "Example", "TaskData", "TestSource",
    "bucket_length", "collate", "encode_dataset", "encode_example", "encode_prompts",
    "length_grouped_batches", "load_corpus", "load_task", "prompt_text",
]
