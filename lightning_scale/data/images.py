"""Image-classification data that works offline: sklearn digits, CIFAR-10 pickles, image folders.

Sources, chosen by ``path`` (see :class:`ImageDataModule`):

* ``None``: scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``): 1,797
  real 8x8 grayscale images, pixel values 0..16, 10 classes. Ships with scikit-learn: no download.
* a CIFAR-10 directory in the standard *python* format (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``, ``batches.meta``; also accepted: its parent holding ``cifar-10-batches-py/``).
  Train = the five data batches, val = ``test_batch``.
* a folder of class sub-directories (``root/<class>/<image>``, png/jpg/jpeg/bmp); with ``train/``
  and ``val/`` sub-folders (``root/train/<class>/...``, ``root/val/<class>/...``) they are the
  split, otherwise a seeded, stratified split by ``val_fraction``.

Every item is ``(x, y)``: ``x`` float32 ``(C, H, W)`` normalised per channel with the mean/std of
the *train* split, ``y`` int64 class index. Splits are deterministic (seeded numpy permutation per
class), identical on every rank.

The torch-only part (loaders, :func:`stratified_split`, :func:`channel_stats`,
:class:`NormalizedImageDataset`) does not use Lightning; :class:`ImageDataModule` is the adapter.
Images are held in memory (uint8 where possible: N*C*H*W bytes; CIFAR-10 train is ~150 MB), which
suits the small, offline data sets this module targets.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_scale.data.base import OfflineDataModule, check_loader_args

__all__ = [
    "CIFAR10_META_FILE",
    "CIFAR10_TEST_FILE",
    "CIFAR10_TRAIN_FILES",
    "IMAGE_EXTENSIONS",
    "ImageDataModule",
    "NormalizedImageDataset",
    "channel_stats",
    "load_cifar10_batch",
    "load_cifar10_meta",
    "load_digits_arrays",
    "load_image",
    "scan_image_folder",
    "stratified_split",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR10_FILES: tuple[str, ...] = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE, CIFAR10_META_FILE)
CIFAR10_SUBDIR = "cifar-10-batches-py"  # what the official tarball extracts to
CIFAR10_IMAGE_SIZE = 32  # each row of b"data" is 3 * 32 * 32 = 3072 bytes, channel-major (CHW)

_CIFAR10_LAYOUT = (
    "a CIFAR-10 python directory holds data_batch_1 .. data_batch_5, test_batch and "
    "batches.meta (the contents of cifar-10-python.tar.gz)"
)
_FOLDER_LAYOUT = (
    "an image class folder holds one sub-directory per class containing image files "
    f"({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}), e.g. root/cat/001.png, root/dog/002.png; "
    "optionally split as root/train/<class>/... and root/val/<class>/..."
)


# --------------------------------------------------------------------------------------------
# CIFAR-10 pickles, loaded with a restricted unpickler
# --------------------------------------------------------------------------------------------

# Unpickling can execute arbitrary code via the globals a pickle names. A CIFAR-10 batch is a
# plain dict of bytes, lists and one numpy array, so the only globals it may name are the ones
# numpy uses to rebuild an array (and `_codecs.encode`, which Python 3 writes for bytes in
# protocol-2 pickles). Anything else is refused.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)
# numpy >= 2 moved numpy.core to numpy._core (the old name is a deprecated alias).
_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") is not None else "numpy.core"


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy array-reconstruction globals listed above."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (only numpy arrays are allowed)"
            )
        if module.startswith("numpy.core."):
            module = _NUMPY_CORE + module[len("numpy.core") :]
        return super().find_class(module, name)


def _safe_unpickle(f: BinaryIO) -> Any:
    # encoding="bytes": the official files are Python 2 pickles whose str objects (dict keys such
    # as b"data", label names) must load as bytes; latin-1/ascii decoding would corrupt nothing
    # here but "bytes" is the documented, lossless choice.
    return _ArrayOnlyUnpickler(f, encoding="bytes").load()


def _get(d: dict[Any, Any], key: str) -> Any:
    """``d[b"key"]`` (official Python 2 pickles) or ``d["key"]`` (re-saved by Python 3)."""
    if key.encode() in d:
        return d[key.encode()]
    return d[key]


def load_cifar10_meta(file: str | Path) -> list[str]:
    """Class names (``b"label_names"``) from a CIFAR-10 ``batches.meta`` file."""
    file = Path(file)
    try:
        with file.open("rb") as f:
            meta = _safe_unpickle(f)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, "label_names")]
    except Exception as err:
        raise ValueError(
            f"{str(file)!r} is not a valid CIFAR-10 python batches.meta file (a pickled dict "
            f"with b'label_names'): {type(err).__name__}: {err}. Re-extract "
            f"cifar-10-python.tar.gz; {_CIFAR10_LAYOUT}."
        ) from err
    if not names:
        raise ValueError(f"{str(file)!r} lists no label_names; {_CIFAR10_LAYOUT}.")
    return names


def load_cifar10_batch(
    file: str | Path, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Load one CIFAR-10 python batch file.

    Returns:
        ``images`` uint8 ``(N, 3, 32, 32)`` and ``labels`` int64 ``(N,)``.

    Raises:
        ValueError: the file is not a pickled dict with ``b"data"`` uint8 ``(N, 3072)`` and
            ``b"labels"`` (N ints in ``[0, num_classes)``); the unpickling error is chained.
    """
    file = Path(file)
    what = f"{str(file)!r} is not a valid CIFAR-10 python batch file"
    try:
        with file.open("rb") as f:
            batch = _safe_unpickle(f)
        data = np.asarray(_get(batch, "data"))
        labels = np.asarray(_get(batch, "labels"), dtype=np.int64)
    except Exception as err:
        raise ValueError(
            f"{what} (a pickled dict with b'data' uint8 (N, 3072) and b'labels'): "
            f"{type(err).__name__}: {err}. Re-extract cifar-10-python.tar.gz."
        ) from err
    if data.ndim != 2 or data.shape[1] != 3 * CIFAR10_IMAGE_SIZE**2 or data.dtype != np.uint8:
        raise ValueError(
            f"{what}: b'data' has shape {data.shape} and dtype {data.dtype}, expected uint8 "
            f"(N, {3 * CIFAR10_IMAGE_SIZE ** 2})."
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{what}: {labels.size} labels for {data.shape[0]} images.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{what}: labels span [{labels.min()}, {labels.max()}], expected [0, {num_classes})."
        )
    # Rows are the R plane, then G, then B, each 32x32 row-major: a reshape gives CHW.
    # np.array copies: arrays rebuilt from pickle buffers may be read-only.
    images = np.array(data.reshape(-1, 3, CIFAR10_IMAGE_SIZE, CIFAR10_IMAGE_SIZE), copy=True)
    return images, labels


# --------------------------------------------------------------------------------------------
# Digits and image folders
# --------------------------------------------------------------------------------------------


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images float32 ``(1797, 1, 8, 8)`` in 0..16, labels int64 ``(1797,)``.

    The data ship inside scikit-learn (``sklearn/datasets/data/digits.csv.gz``): no download.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32)[:, None]  # (N, 8, 8) -> (N, 1, 8, 8)
    return images, np.asarray(digits.target, dtype=np.int64)


def _list_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursive), sorted by relative POSIX path."""
    files = (
        p
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(
    root: Path, classes: list[str] | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes and ``(file, label)`` samples of a class folder ``root/<class>/**/<image>``.

    Args:
        root: the folder whose sub-directories are the classes.
        classes: the class list to index labels by (for a ``val/`` folder: the ``train/`` classes);
            ``None`` uses ``root``'s sorted sub-directory names.

    Raises:
        ValueError: no class sub-directory, a class sub-directory without images, or a class in
            ``root`` that is not in ``classes``.
    """
    dirs = _subdirs(root)
    if not dirs:
        loose = _list_images(root)
        hint = (
            f" It holds {len(loose)} image file(s) directly: move them into one sub-directory "
            f"per class."
            if loose
            else ""
        )
        raise ValueError(
            f"{str(root)!r} has no class sub-directories. Expected {_FOLDER_LAYOUT}.{hint}"
        )
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(
            f"{str(root)!r} has class sub-directories {unknown} that are not among the training "
            f"classes {classes}: a val/ folder must use the class names of train/."
        )
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    for d in dirs:
        files = _list_images(d)
        if not files:
            raise ValueError(
                f"Class folder {str(d)!r} contains no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}). Expected {_FOLDER_LAYOUT}. Add images or "
                f"remove the empty sub-directory."
            )
        samples.extend((f, index[d.name]) for f in files)
    return classes, samples


def load_image(file: Path, size: int | None, mode: Literal["RGB", "L"] = "RGB") -> np.ndarray:
    """One image as uint8 ``(C, H, W)`` (C = 3 for RGB, 1 for L), resized to ``size x size``.

    Resizing (bilinear, antialiased by Pillow) ignores the aspect ratio.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Cannot read image {str(file)!r}: {err}. Remove or replace it.") from err
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W) -> (H, W, 1)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def _probe_image(file: Path) -> tuple[int, int]:
    """``(width, height)`` of an image, reading only its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Cannot read image {str(file)!r}: {err}. Remove or replace it.") from err


# --------------------------------------------------------------------------------------------
# Split, statistics, dataset
# --------------------------------------------------------------------------------------------


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of sample indices.

    For each class (ascending), its indices are permuted by one ``np.random.default_rng(seed)``
    and ``round(n_c * val_fraction)`` of them go to validation, clamped to ``[1, n_c - 1]`` so
    that every class with two or more examples appears in both splits (a class with a single
    example stays in train).

    Returns:
        ``(train_idx, val_idx)``: sorted int64 index arrays, disjoint, covering all samples.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}.")
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        # Round to nearest, but keep >= 1 val and >= 1 train example in every class of 2+.
        n_val = min(max(math.floor(idx.size * val_fraction + 0.5), 1), idx.size - 1)
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    empty = np.empty(0, dtype=np.int64)
    train = np.sort(np.concatenate(train_parts)) if train_parts else empty
    val = np.sort(np.concatenate(val_parts)) if val_parts else empty
    return train.astype(np.int64), val.astype(np.int64)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of ``images`` ``(N, C, H, W)``, as float32 ``(C,)``.

    Accumulated in float64 over chunks of ``chunk`` images, so uint8 CIFAR-10 never needs a full
    float copy. A constant channel gets std 1 (normalisation then only centres it).
    """
    n, c = images.shape[:2]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, chunk):
        x = images[start : start + chunk].to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float(), std.float()


def _resize_tensor(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of ``(N, C, H, W)`` to ``(N, C, size, size)``, same dtype."""
    out = []
    for start in range(0, images.shape[0], chunk):
        x = F.interpolate(
            images[start : start + chunk].float(),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        if images.dtype == torch.uint8:
            x = x.round().clamp(0, 255).to(torch.uint8)
        out.append(x)
    return torch.cat(out) if out else images.new_empty((0, images.shape[1], size, size))


class NormalizedImageDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """In-memory images, normalised per channel when an item is read.

    Args:
        images: ``(N, C, H, W)``, any real dtype (uint8 keeps memory at 1 byte per value).
        labels: int64 ``(N,)``.
        mean, std: float32 ``(C,)``, in the units of ``images``.

    Item: ``((images[i] - mean) / std`` as float32 ``(C, H, W)``, ``labels[i]`` int64 scalar).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> None:
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"expected images (N, C, H, W) and labels (N,); got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.mean = mean.float().view(-1, 1, 1)  # (C, 1, 1)
        self.inv_std = (1.0 / std.float()).view(-1, 1, 1)  # (C, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[index].float() - self.mean) * self.inv_std  # (C, H, W) float32
        return x, self.labels[index]


# --------------------------------------------------------------------------------------------
# Lightning adapter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What ``path`` points to, found cheaply in ``__init__``."""

    kind: Literal["digits", "cifar10", "folder"]
    root: Path | None
    classes: list[str]
    in_channels: int
    native_size: int | None  # side of the square images on disk (None: not square / varies)
    train_root: Path | None = None  # folder sources: class folder of the train (or only) split
    val_root: Path | None = None  # folder sources with train/ and val/: class folder of val


class ImageDataModule(OfflineDataModule):
    """Image classification data from sklearn digits, CIFAR-10 pickles or an image class folder.

    Args:
        path: ``None`` for scikit-learn's bundled digits (1,797 8x8 grayscale images, 10
            classes); a CIFAR-10 python directory (``data_batch_1``..``data_batch_5``,
            ``test_batch``, ``batches.meta``, or its parent holding ``cifar-10-batches-py/``);
            or a class folder ``root/<class>/<image>`` (png/jpg/jpeg/bmp), optionally split as
            ``root/train/<class>/...`` and ``root/val/<class>/...``.
        image_size: side in pixels of the square images the model sees. ``None`` keeps the native
            size (8 for digits, 32 for CIFAR-10, that of the images in a folder, which must then
            all be square and equal). Otherwise every image is resized (bilinear, aspect ratio
            not kept).
        batch_size: examples per batch, per device; must be >= 1.
        val_fraction: fraction of each class held out for validation when the source has no
            validation split of its own (digits, unsplit folders); in (0, 1).
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: seed of the stratified train/val split and of the train-loader shuffle.
        grayscale: folders only: convert images to 1-channel luminance instead of RGB.
        drop_last: drop the last incomplete train batch (constant batch shapes; no size-1 batch
            for BatchNorm).
        pin_memory: pin host memory of batches (only useful with a CUDA device).

    Attributes available right after ``__init__`` (LightningCLI links them into the model):
        num_classes, in_channels, image_size, classes (class names).

    The source is identified and checked in ``__init__`` (a listing and a few small reads); the
    images are loaded in :meth:`setup`, deterministically, identically on every rank. Items are
    ``(x, y)``: ``x`` float32 ``(C, H, W)`` normalised per channel with the train split's
    mean/std (attributes ``mean``, ``std`` after setup), ``y`` int64.
    """

    def __init__(
        self,
        path: str | None = None,
        image_size: int | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        num_workers: int = 0,
        seed: int = 0,
        grayscale: bool = False,
        drop_last: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"image_size must be an integer >= 1 (side in pixels, e.g. 32) or None (native size); got "
                             f"{image_size!r}.")
        check_loader_args(batch_size, val_fraction, num_workers, "e.g. 0.2 holds out 20% of each class")
        self.save_hyperparameters()
        self.path = None if path is None else str(path)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.grayscale = grayscale
        self.drop_last = drop_last
        self.pin_memory = pin_memory

        self._first_image_size: tuple[int, int] | None = None  # (W, H), folders only
        self._source = self._inspect(self.path)
        self.classes: list[str] = list(self._source.classes)
        self.num_classes: int = len(self.classes)
        self.in_channels: int = self._source.in_channels
        native = self._source.native_size
        if image_size is None and native is None:
            raise ValueError(
                f"Images in {self.path!r} are not square (first image WxH: "
                f"{self._first_image_size}); set image_size to resize them to a square."
            )
        # The side the model sees (checked above: native is set when image_size is None).
        self.image_size: int = image_size if image_size is not None else int(native or 0)
        self._resize: int | None = image_size  # None: keep native pixels

        self.mean: torch.Tensor | None = None  # (C,) float32, train-split statistics
        self.std: torch.Tensor | None = None  # (C,) float32
        self.train_dataset: NormalizedImageDataset | None = None
        self.val_dataset: NormalizedImageDataset | None = None

    # ---- source identification (cheap, in __init__) ------------------------------------------

    def _inspect(self, path: str | None) -> _Source:
        if path is None:
            return _Source("digits", None, [str(i) for i in range(10)], 1, 8)
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"Image data path {str(root)!r} does not exist. Expected either "
                f"{_CIFAR10_LAYOUT}, or {_FOLDER_LAYOUT}. Fix `path`, or set path=None for "
                f"scikit-learn's bundled digits."
            )
        if not root.is_dir():
            raise ValueError(
                f"Image data path {str(root)!r} is a file; expected a directory: "
                f"{_CIFAR10_LAYOUT}, or {_FOLDER_LAYOUT}."
            )
        if (root / CIFAR10_SUBDIR).is_dir() and not any((root / n).exists() for n in CIFAR10_FILES):
            root = root / CIFAR10_SUBDIR
        present = [n for n in CIFAR10_FILES if (root / n).is_file()]
        if present:
            missing = [n for n in CIFAR10_FILES if n not in present]
            if missing:
                raise FileNotFoundError(
                    f"{str(root)!r} looks like a CIFAR-10 python directory (has "
                    f"{', '.join(present)}) but is missing {', '.join(missing)}: "
                    f"{_CIFAR10_LAYOUT}. Re-extract cifar-10-python.tar.gz there."
                )
            classes = load_cifar10_meta(root / CIFAR10_META_FILE)
            return _Source("cifar10", root, classes, 3, CIFAR10_IMAGE_SIZE)
        return self._inspect_folder(root)

    def _inspect_folder(self, root: Path) -> _Source:
        names = {d.name for d in _subdirs(root)} if root.is_dir() else set()
        if not names:
            loose = _list_images(root)
            hint = (
                f" It holds {len(loose)} image file(s) directly: move them into one "
                f"sub-directory per class."
                if loose
                else ""
            )
            raise ValueError(
                f"Image data path {str(root)!r} is neither a CIFAR-10 python directory nor an "
                f"image class folder: it has no CIFAR-10 batch files and no sub-directories. "
                f"Expected {_CIFAR10_LAYOUT}, or {_FOLDER_LAYOUT}.{hint}"
            )
        train_root, val_root = root, None
        if {"train", "val"} <= names:
            train_root, val_root = root / "train", root / "val"
        classes, samples = scan_image_folder(train_root)
        if val_root is not None:
            scan_image_folder(val_root, classes)  # validates layout and non-empty classes
        width, height = _probe_image(samples[0][0])
        self._first_image_size = (width, height)
        return _Source(
            "folder",
            root,
            classes,
            1 if self.grayscale else 3,
            width if width == height else None,
            train_root,
            val_root,
        )

    # ---- loading (setup) ---------------------------------------------------------------------

    def _load_folder(self, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """All images of a class folder: uint8 ``(N, C, S, S)`` and int64 labels ``(N,)``."""
        _, samples = scan_image_folder(root, self.classes)
        mode: Literal["RGB", "L"] = "L" if self.grayscale else "RGB"
        arrays = []
        for file, _ in samples:
            array = load_image(file, self._resize, mode)  # (C, H, W) uint8
            if array.shape[1:] != (self.image_size, self.image_size):
                raise ValueError(
                    f"Image {str(file)!r} is {array.shape[2]}x{array.shape[1]} (WxH), but the "
                    f"folder's first image is {self.image_size}x{self.image_size}: set image_size "
                    f"to resize all images to one size."
                )
            arrays.append(array)
        images = torch.from_numpy(np.stack(arrays))
        labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        return images, labels

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train_images, train_labels, val_images, val_labels)`` at native size."""
        src = self._source
        if src.kind == "cifar10":
            assert src.root is not None
            parts = [
                load_cifar10_batch(src.root / name, self.num_classes)
                for name in CIFAR10_TRAIN_FILES
            ]
            x_val, y_val = load_cifar10_batch(src.root / CIFAR10_TEST_FILE, self.num_classes)
            return (
                torch.from_numpy(np.concatenate([p[0] for p in parts])),
                torch.from_numpy(np.concatenate([p[1] for p in parts])),
                torch.from_numpy(x_val),
                torch.from_numpy(y_val),
            )
        if src.kind == "folder" and src.val_root is not None:
            assert src.train_root is not None
            return (*self._load_folder(src.train_root), *self._load_folder(src.val_root))
        if src.kind == "digits":
            images_np, labels_np = load_digits_arrays()
            images, labels = torch.from_numpy(images_np), torch.from_numpy(labels_np)
        else:
            assert src.train_root is not None
            images, labels = self._load_folder(src.train_root)
        train_idx, val_idx = stratified_split(labels.numpy(), self.val_fraction, self.seed)
        if train_idx.size == 0 or val_idx.size == 0:
            raise ValueError(
                f"Image data {self.path!r} has {labels.numel()} images: too few for a train and "
                f"a validation split with val_fraction={self.val_fraction}. Add images (at least "
                f"2 per class) or change val_fraction."
            )
        t, v = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        return images[t], labels[t], images[v], labels[v]

    def setup(self, stage: str | None = None) -> None:
        """Load the images (once), split, compute train mean/std and build the datasets."""
        if self.train_dataset is not None:
            return
        x_train, y_train, x_val, y_val = self._load()
        if self._resize is not None and self._source.kind != "folder":  # folders resize on load
            x_train = _resize_tensor(x_train, self._resize)
            x_val = _resize_tensor(x_val, self._resize)
        self.mean, self.std = channel_stats(x_train)
        self.train_dataset = NormalizedImageDataset(x_train, y_train, self.mean, self.std)
        self.val_dataset = NormalizedImageDataset(x_val, y_val, self.mean, self.std)

    # ---- loaders -----------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (seeded) train batches: ``x`` ``(B, C, S, S)`` float32, ``y`` ``(B,)`` int64."""
        train, _ = self._require_setup()
        per_rank = math.ceil(len(train) / self._data_replicas())
        if self.drop_last and per_rank < self.batch_size:
            raise ValueError(
                f"The train split of {self.path or 'digits'!r} has {len(train)} images "
                f"({per_rank} per rank), fewer than batch_size={self.batch_size}: with "
                f"drop_last=True no batch would be produced. Reduce batch_size or set "
                f"drop_last=False."
            )
        return self._loader(train, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        """Validation batches in order (no shuffle, last partial batch kept)."""
        _, val = self._require_setup()
        return self._loader(val, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        """Same as :meth:`val_dataloader` (CIFAR-10: the official test batch)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        """Same as :meth:`val_dataloader`."""
        return self.val_dataloader()
