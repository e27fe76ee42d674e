"""Offline data modules: byte-level text (language modelling) and images (classification).

Nothing here downloads: the defaults are CPython's ``pydoc_data`` help text and scikit-learn's
bundled digits; user data is read from ``path`` (text files, CIFAR-10 pickles, image folders).
"""

from lightning_scale.data.images import (
    ImageDataModule,
    NormalizedImageDataset,
    channel_stats,
    load_cifar10_batch,
    load_cifar10_meta,
    load_digits_arrays,
    stratified_split,
)
from lightning_scale.data.text import (
    VOCAB_SIZE,
    ByteBlockDataset,
    TextDataModule,
    decode,
    default_corpus_bytes,
    encode,
    load_corpus_bytes,
    num_blocks,
    split_tokens,
)

__all__ = [
    "VOCAB_SIZE",
    "ByteBlockDataset",
    "ImageDataModule",
    "NormalizedImageDataset",
    "TextDataModule",
    "channel_stats",
    "decode",
    "default_corpus_bytes",
    "encode",
    "load_cifar10_batch",
    "load_cifar10_meta",
    "load_digits_arrays",
    "load_corpus_bytes",
    "num_blocks",
    "split_tokens",
    "stratified_split",
]
