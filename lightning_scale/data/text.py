"""Byte-level language-modelling data that works offline.

Two layers, in the order the design guide asks for:

* a torch-only part (:func:`encode`, :func:`decode`, :func:`load_corpus_bytes`,
  :func:`split_tokens`, :class:`ByteBlockDataset`) usable from plain PyTorch or Fabric, and
* :class:`TextDataModule`, a thin ``lightning.LightningDataModule`` adapter over it whose typed,
  documented ``__init__`` arguments LightningCLI reads from YAML.

Tokens are the UTF-8 bytes of the text (vocabulary of 256, no tokenizer to download). The default
corpus is the pydoc topic help that ships with every CPython (``pydoc_data.topics``, ~465K
characters), so a recipe runs with no data on disk and no network.

Split (deterministic, identical on every rank, no randomness at all)::

    tokens:  [ t_0 ............................ t_{S-1} | t_S ................ t_{N-1} ]
               train = tokens[:S]                          val = tokens[S:]
    S = floor(N * (1 - val_fraction))

Each split is cut into non-overlapping blocks of ``block_size`` T (stride T). Block ``i`` yields
``x = s[i*T : i*T+T]`` and ``y = s[i*T+1 : i*T+T+1]`` (the next-byte targets), both ``int64`` of
shape ``(T,)``. Targets never cross the split boundary, so there are ``(len(s) - 1) // T`` blocks
in a split ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_scale.data.base import OfflineDataModule, check_loader_args

__all__ = [
    "VOCAB_SIZE",
    "ByteBlockDataset",
    "TextDataModule",
    "decode",
    "default_corpus_bytes",
    "encode",
    "load_corpus_bytes",
    "num_blocks",
    "split_tokens",
]

#: Byte-level vocabulary: one token per possible byte value.
VOCAB_SIZE: int = 256

#: Separator inserted between documents (topics of the default corpus, files of a directory).
DOCUMENT_SEPARATOR: bytes = b"\n\n"


# --------------------------------------------------------------------------------------------
# Torch-only part
# --------------------------------------------------------------------------------------------


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as an ``int64`` tensor of shape ``(len(bytes),)``, values 0..255."""
    data = text.encode("utf-8")
    if not data:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode(tokens: torch.Tensor | Sequence[int]) -> str:
    """Inverse of :func:`encode`.

    Args:
        tokens: any integer tensor or sequence with values in ``[0, 256)``; it is flattened.
            Byte sequences that are not valid UTF-8 (e.g. a block cut mid-character) decode to
            U+FFFD replacement characters instead of raising.
    """
    values = torch.as_tensor(tokens).reshape(-1)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= VOCAB_SIZE):
        raise ValueError(
            f"decode() expects byte tokens in [0, {VOCAB_SIZE}); got values in "
            f"[{int(values.min())}, {int(values.max())}]. Pass tokens sampled from a model "
            f"with vocab_size={VOCAB_SIZE}."
        )
    return bytes(values.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def default_corpus_bytes() -> bytes:
    """The default corpus: CPython's ``pydoc_data.topics.topics`` as UTF-8 bytes.

    The dict values are joined in sorted key order with a blank line between topics, so the
    corpus is identical on every machine running the same CPython version (~465K characters).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions split pydoc_data into a separate package
        raise FileNotFoundError(
            "The default text corpus needs the standard-library module `pydoc_data` "
            "(pydoc_data/topics.py), which this Python installation lacks. Install the full "
            "standard library (e.g. the python3-doc / libpython-stdlib package) or pass "
            "path=<a .txt file or a directory of .txt files>."
        ) from err
    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def resolve_corpus_files(path: str | Path, pattern: str = "**/*.txt") -> list[Path]:
    """The files that make up the corpus at ``path``, in a deterministic order.

    Args:
        path: a text file (``pattern`` is ignored) or a directory.
        pattern: glob relative to a directory ``path``; ``"**/"`` recurses into sub-directories.

    Returns:
        A file path, or every regular file under the directory matching ``pattern``, sorted by
        relative POSIX path (so the order does not depend on the file system).

    Raises:
        FileNotFoundError: ``path`` does not exist, or the directory has no matching file.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"Text corpus path {str(root)!r} does not exist. Expected a text file, or a "
            f"directory containing files that match pattern {pattern!r} (e.g. "
            f"{str(root / 'book.txt')!r}). Fix `path`, or set path=None for the built-in corpus."
        )
    if root.is_file():
        return [root]
    if not pattern:
        raise ValueError("pattern must be a non-empty glob such as '**/*.txt'.")
    files = sorted(
        (p for p in root.glob(pattern) if p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(
            f"Text corpus directory {str(root)!r} has no file matching pattern {pattern!r}. "
            f"Expected layout: {str(root)}/<name>.txt (or nested, with '**/'). Add files, or "
            f"change `pattern` (e.g. '**/*' for every file, '*.md' for markdown)."
        )
    return files


def load_corpus_bytes(path: str | Path | None = None, pattern: str = "**/*.txt") -> bytes:
    """Raw bytes of the corpus: the default one if ``path`` is None, else file(s) at ``path``.

    Files are read as bytes (any encoding is fine for a byte-level model) and joined with
    :data:`DOCUMENT_SEPARATOR`.
    """
    if path is None:
        return default_corpus_bytes()
    return DOCUMENT_SEPARATOR.join(p.read_bytes() for p in resolve_corpus_files(path, pattern))


def split_tokens(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous split ``(tokens[:S], tokens[S:])`` with ``S = floor(N * (1 - val_fraction))``.

    Both outputs are views of ``tokens`` (no copy).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}.")
    split = math.floor(tokens.numel() * (1.0 - val_fraction))
    return tokens[:split], tokens[split:]


def num_blocks(num_tokens: int, block_size: int) -> int:
    """Number of ``(x, y)`` blocks of length ``block_size`` with stride ``block_size``.

    A block needs ``block_size + 1`` tokens (``y`` is ``x`` shifted by one), and consecutive
    blocks share one boundary token, hence ``(num_tokens - 1) // block_size`` (0 if empty).
    """
    return max(num_tokens - 1, 0) // block_size


class ByteBlockDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping next-token blocks over a 1-D token stream.

    Args:
        tokens: 1-D integer tensor ``(N,)``; stored as given (``uint8`` keeps 1 byte per token),
            items are converted to ``int64``.
        block_size: sequence length T of every item.

    Item ``i``: ``(x, y)`` with ``x = tokens[i*T : i*T+T]``, ``y = tokens[i*T+1 : i*T+T+1]``,
    both ``int64`` of shape ``(T,)``.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D; got shape {tuple(tokens.shape)}.")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {block_size}.")
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return num_blocks(self.tokens.numel(), self.block_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"block index {index} out of range for {n} blocks")
        start = index * self.block_size
        chunk = self.tokens[start : start + self.block_size + 1].long()  # (T+1,)
        return chunk[:-1], chunk[1:]


# --------------------------------------------------------------------------------------------
# Lightning adapter
# --------------------------------------------------------------------------------------------


class TextDataModule(OfflineDataModule):
    """Byte-level language-modelling data (vocab 256) from the built-in corpus or your text.

    Args:
        path: ``None`` for the built-in corpus (CPython's ``pydoc_data.topics``, ~465 KB); a
            text file; or a directory whose files matching ``pattern`` are concatenated in
            sorted order. Files are read as bytes, so any encoding works.
        pattern: glob for a directory ``path`` (ignored otherwise); ``"**/*.txt"`` recurses.
        block_size: sequence length T of every example (tokens = bytes); must be >= 1.
        batch_size: examples per batch, per device; must be >= 1.
        val_fraction: fraction of the token stream (its tail) held out for validation/test,
            in (0, 1).
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: seed of the train-loader shuffle; same seed, same batch order. (Under DDP Lightning
            replaces the sampler by a ``DistributedSampler`` seeded by ``seed_everything``.)
        pin_memory: pin host memory of batches (only useful with a CUDA device).
        num_prompts: number of prompts served by ``predict_dataloader`` (sample generation).
        prompt_length: length in bytes of each prompt, taken from the validation split.

    Attributes:
        vocab_size: 256, to link into the model config.
        train_dataset / val_dataset: :class:`ByteBlockDataset` after :meth:`setup`.

    The path is checked in ``__init__`` (missing path, no matching file); the corpus is read in
    :meth:`setup`, once per process, with no randomness, so every rank builds identical splits.
    """

    vocab_size: int = VOCAB_SIZE

    def __init__(
        self,
        path: str | None = None,
        pattern: str = "**/*.txt",
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        num_prompts: int = 4,
        prompt_length: int = 32,
    ) -> None:
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1 (tokens per example, e.g. 128); got {block_size!r}.")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"pattern must be a non-empty glob such as '**/*.txt'; got {pattern!r}.")
        check_loader_args(batch_size, val_fraction, num_workers, "e.g. 0.1 keeps the last 10% of the corpus for validation")
        if num_prompts < 1 or prompt_length < 1:
            raise ValueError(
                f"num_prompts and prompt_length must be >= 1; got {num_prompts}, {prompt_length}."
            )
        self.save_hyperparameters()
        self.path = None if path is None else str(path)
        self.pattern = pattern
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.num_prompts = num_prompts
        self.prompt_length = prompt_length
        # Fail fast on a wrong path (cheap: a stat and a glob, no reading).
        self.files: list[Path] | None = (
            None if self.path is None else resolve_corpus_files(self.path, pattern)
        )
        self.tokens: torch.Tensor | None = None  # (N,) uint8, after setup()
        self.train_dataset: ByteBlockDataset | None = None
        self.val_dataset: ByteBlockDataset | None = None

    # ---- description -------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """Human-readable corpus origin, for messages."""
        return "pydoc_data.topics (built-in)" if self.path is None else repr(self.path)

    # ---- Lightning hooks ---------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Read the corpus (once) and build the deterministic train/val block datasets."""
        if self.tokens is not None:
            return
        if self.files is None:
            data = default_corpus_bytes()
        else:
            data = DOCUMENT_SEPARATOR.join(p.read_bytes() for p in self.files)
        tokens = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )
        train_tokens, val_tokens = split_tokens(tokens, self.val_fraction)
        n_train = num_blocks(train_tokens.numel(), self.block_size)
        n_val = num_blocks(val_tokens.numel(), self.block_size)
        if n_train < 1 or n_val < 1:
            need = math.ceil((self.block_size + 1) / min(self.val_fraction, 1 - self.val_fraction))
            fix = (
                "Reduce block_size or val_fraction, or add text."
                if n_train < 1
                else "Reduce block_size, increase val_fraction, or add text."
            )
            raise ValueError(
                f"Text corpus {self.source} is too small: {tokens.numel()} bytes give "
                f"{n_train} train and {n_val} validation blocks of block_size={self.block_size} "
                f"with val_fraction={self.val_fraction} (each split needs block_size + 1 bytes; "
                f"about {need} bytes in total). {fix}"
            )
        self.tokens = tokens
        self.train_dataset = ByteBlockDataset(train_tokens, self.block_size)
        self.val_dataset = ByteBlockDataset(val_tokens, self.block_size)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (seeded) train blocks, ``drop_last=True``: batches ``x, y`` of ``(B, T)``."""
        train, _ = self._require_setup()
        per_rank = math.ceil(len(train) / self._data_replicas())
        if per_rank < self.batch_size:
            raise ValueError(
                f"Text corpus {self.source} has {len(train)} train blocks of block_size="
                f"{self.block_size} ({per_rank} per rank), fewer than batch_size="
                f"{self.batch_size}: with drop_last=True no train batch would be produced. "
                f"Reduce batch_size or block_size, or add text."
            )
        return self._loader(train, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        """Validation blocks in order (no shuffle, last partial batch kept)."""
        _, val = self._require_setup()
        return self._loader(val, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        """Same as :meth:`val_dataloader` (the held-out tail of the corpus)."""
        return self.val_dataloader()

    def prompts(self) -> torch.Tensor:
        """``num_prompts`` prompts of ``prompt_length`` bytes, evenly spaced over the val split.

        Returns:
            ``int64`` tensor ``(P, L)``; ``L`` is capped at the val split length.
        """
        _, val = self._require_setup()
        stream = val.tokens
        length = min(self.prompt_length, stream.numel())
        last_start = stream.numel() - length
        starts = torch.linspace(0, last_start, self.num_prompts).round().long().tolist()
        return torch.stack([stream[s : s + length].long() for s in starts])

    def predict_dataloader(self) -> DataLoader[torch.Tensor]:
        """One batch of :meth:`prompts`, ``(P, L)`` int64, for sample generation."""
        prompts = self.prompts()
        return DataLoader(list(prompts), batch_size=len(prompts), shuffle=False)

    # ---- helpers exposed on the module for convenience ---------------------------------------

    @staticmethod
    def encode(text: str) -> torch.Tensor:
        """See :func:`encode`."""
        return encode(text)

    @staticmethod
    def decode(tokens: torch.Tensor | Sequence[int]) -> str:
        """See :func:`decode`."""
        return decode(tokens)
