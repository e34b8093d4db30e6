"""Training data: the window-source contract the training loop reads, and its implementations.

* :func:`build_corpus` - train / held-out JSONL of the Python stdlib's docstrings (no download).
* :func:`train_tokenizer`, :func:`load_tokenizer`, :func:`tokenizer_fingerprint` - tokenizers.
* :func:`clean_jsonl` - streaming normalisation, filters, exact and near-duplicate removal.
* :func:`tokenize_to_shards`, :func:`verify_shards` - tokenised shards on disk.
* :class:`ShardSource`, :func:`source_from_dataset` - :class:`WindowSource` implementations for training.
"""

from myllm.data.clean import CleanConfig, clean_jsonl
from myllm.data.corpus import CorpusStats, build_corpus
from myllm.data.hf_dataset import dataset_to_shards, source_from_dataset
from myllm.data.io import JsonlError
from myllm.data.packing import pack_window
from myllm.data.shards import ShardError, ShardSet, verify_shards
from myllm.data.source import Window, WindowSource
from myllm.data.tokenize import tokenize_to_shards
from myllm.data.tokenizer import CHATML_TEMPLATE, load_tokenizer, tokenizer_fingerprint, train_tokenizer
from myllm.data.windows import PackedSource, ShardSource

__all__ = [
    "CHATML_TEMPLATE",
    "CleanConfig",
    "CorpusStats",
    "JsonlError",
    "PackedSource",
    "ShardError",
    "ShardSet",
    "ShardSource",
    "Window",
    "WindowSource",
    "build_corpus",
    "clean_jsonl",
    "dataset_to_shards",
    "load_tokenizer",
    "pack_window",
    "source_from_dataset",
    "tokenize_to_shards",
    "tokenizer_fingerprint",
    "train_tokenizer",
    "verify_shards",
]
