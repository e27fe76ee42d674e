"""Tests for lightning_scale.data: byte-level text and image data modules (offline, fast)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_scale.data import (
    ByteBlockDataset,
    ImageDataModule,
    TextDataModule,
    decode,
    encode,
    load_cifar10_batch,
    stratified_split,
)

# ============================================================================================
# Text
# ============================================================================================


@pytest.fixture(scope="module")
def default_text() -> TextDataModule:
    dm = TextDataModule(block_size=64, batch_size=8, val_fraction=0.1)
    dm.setup()
    return dm


def test_default_corpus_size_and_vocab(default_text: TextDataModule) -> None:
    assert default_text.tokens is not None
    assert default_text.tokens.numel() > 400_000
    assert TextDataModule.vocab_size == 256 and default_text.vocab_size == 256
    # The built-in corpus is readable English help text.
    assert "for" in decode(default_text.tokens[:5000])


def test_encode_decode_round_trip() -> None:
    text = "héllo wörld — ∑ 😀\n"
    tokens = encode(text)
    assert tokens.dtype == torch.int64
    assert tokens.numel() == len(text.encode("utf-8"))
    assert int(tokens.max()) < 256 and int(tokens.min()) >= 0
    assert decode(tokens) == text
    assert TextDataModule.decode(TextDataModule.encode(text)) == text
    # A multi-byte character cut in half decodes with a replacement character, not an error.
    assert decode(encode("é")[:1]) == "\ufffd"
    assert encode("").numel() == 0 and decode([]) == ""
    with pytest.raises(ValueError, match="256"):
        decode([300])


def test_items_shift_by_one_and_cover_contiguous_blocks(default_text: TextDataModule) -> None:
    train, val = default_text.train_dataset, default_text.val_dataset
    assert train is not None and val is not None and default_text.tokens is not None
    T = default_text.block_size
    for ds in (train, val):
        for i in (0, 1, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == y.shape == (T,)
            assert x.dtype == y.dtype == torch.int64
            assert torch.equal(x[1:], y[:-1])
            # Non-overlapping stride-T blocks of the split's own stream.
            assert torch.equal(x, ds.tokens[i * T : i * T + T].long())
            assert torch.equal(y, ds.tokens[i * T + 1 : i * T + T + 1].long())
    with pytest.raises(IndexError):
        train[len(train)]


def test_split_is_contiguous_disjoint_and_closed_form(default_text: TextDataModule) -> None:
    tokens = default_text.tokens
    train, val = default_text.train_dataset, default_text.val_dataset
    assert tokens is not None and train is not None and val is not None
    n, T, vf = tokens.numel(), default_text.block_size, default_text.val_fraction
    split = math.floor(n * (1 - vf))
    assert train.tokens.numel() == split and val.tokens.numel() == n - split
    assert torch.equal(torch.cat([train.tokens, val.tokens]), tokens)
    # Closed-form block counts: a block needs T + 1 tokens of its own split.
    assert len(train) == (split - 1) // T
    assert len(val) == (n - split - 1) // T
    # Highest token index read by train (its last y) stays below the val start: no leakage.
    assert len(train) * T <= split - 1
    assert train.tokens.data_ptr() + split == val.tokens.data_ptr()  # views of one stream
    # Batch counts: train drops the last partial batch, val keeps it.
    B = default_text.batch_size
    assert len(default_text.train_dataloader()) == len(train) // B
    assert len(default_text.val_dataloader()) == math.ceil(len(val) / B)


def test_same_seed_same_batches_other_seed_differs() -> None:
    def first_batches(seed: int, k: int = 3) -> list[torch.Tensor]:
        dm = TextDataModule(block_size=32, batch_size=4, seed=seed)
        dm.setup()
        return [x for (x, _), _ in zip(dm.train_dataloader(), range(k))]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    # Validation is not shuffled: first val batch is the first val blocks.
    dm = TextDataModule(block_size=32, batch_size=4)
    dm.setup()
    x, _ = next(iter(dm.val_dataloader()))
    assert dm.val_dataset is not None
    assert torch.equal(x[0], dm.val_dataset[0][0])


def test_setup_is_deterministic_and_idempotent() -> None:
    a, b = TextDataModule(block_size=16), TextDataModule(block_size=16)
    a.setup("fit")
    b.setup("validate")
    assert a.tokens is not None and b.tokens is not None
    assert torch.equal(a.tokens, b.tokens)
    tokens = a.tokens
    a.setup("fit")
    assert a.tokens is tokens


def test_predict_prompts_come_from_val(default_text: TextDataModule) -> None:
    batch = next(iter(default_text.predict_dataloader()))
    assert batch.shape == (default_text.num_prompts, default_text.prompt_length)
    assert batch.dtype == torch.int64
    val = default_text.val_dataset
    assert val is not None
    stream = bytes(val.tokens.tolist())
    for prompt in batch:
        assert bytes(prompt.tolist()) in stream


def test_user_text_file_including_non_utf8(tmp_path: Path) -> None:
    raw = ("abcdefghij" * 30).encode() + b"\xff\xfe\x80 latin-1 caf\xe9"
    file = tmp_path / "corpus.bin"
    file.write_bytes(raw)
    dm = TextDataModule(path=str(file), block_size=8, batch_size=2, val_fraction=0.25)
    dm.setup()
    assert dm.tokens is not None and bytes(dm.tokens.tolist()) == raw
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 8) and y.shape == (2, 8)
    assert "\ufffd" in decode(dm.tokens)  # non-UTF-8 bytes decode with replacement


def test_directory_pattern_and_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("B" * 100)
    (tmp_path / "a.txt").write_text("A" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("C" * 100)
    (tmp_path / "notes.md").write_text("M" * 100)

    dm = TextDataModule(path=str(tmp_path), block_size=4, batch_size=2)
    dm.setup()
    assert dm.tokens is not None
    assert bytes(dm.tokens.tolist()) == b"A" * 100 + b"\n\n" + b"B" * 100 + b"\n\n" + b"C" * 100

    flat = TextDataModule(path=str(tmp_path), pattern="*.txt", block_size=4)
    flat.setup()
    assert flat.tokens is not None and b"C" not in bytes(flat.tokens.tolist())

    md = TextDataModule(path=str(tmp_path), pattern="*.md", block_size=4)
    md.setup()
    assert md.tokens is not None and bytes(md.tokens.tolist()) == b"M" * 100


def test_text_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TextDataModule(path=str(missing))

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "readme.md").write_text("not a txt")
    with pytest.raises(FileNotFoundError, match=r"empty.*pattern") as info:
        TextDataModule(path=str(empty_dir))
    assert str(empty_dir) in str(info.value)

    small = tmp_path / "small.txt"
    small.write_text("x" * 50)
    dm = TextDataModule(path=str(small), block_size=16, val_fraction=0.1)
    with pytest.raises(ValueError, match="Reduce block_size, increase val_fraction") as info:
        dm.setup()  # 45 train bytes (2 blocks), 5 val bytes (0 blocks)
    assert "small.txt" in str(info.value)
    dm = TextDataModule(path=str(small), block_size=16, val_fraction=0.9)
    with pytest.raises(ValueError, match="Reduce block_size or val_fraction") as info:
        dm.setup()  # 5 train bytes (0 blocks)
    assert "small.txt" in str(info.value)

    empty_file = tmp_path / "zero.txt"
    empty_file.write_bytes(b"")
    with pytest.raises(ValueError, match="zero.txt"):
        TextDataModule(path=str(empty_file), block_size=1).setup()

    # Enough for one block per split but not for a train batch with drop_last=True.
    ok = tmp_path / "ok.txt"
    ok.write_text("y" * 100)
    dm = TextDataModule(path=str(ok), block_size=8, batch_size=64)
    dm.setup()
    with pytest.raises(ValueError, match="ok.txt.*batch_size"):
        dm.train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "block_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_text_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)


def test_byte_block_dataset_closed_form() -> None:
    for n in range(0, 40):
        for T in (1, 3, 8):
            ds = ByteBlockDataset(torch.arange(n) % 256, T)
            assert len(ds) == max(n - 1, 0) // T
            if len(ds):
                x, y = ds[len(ds) - 1]
                assert int(y[-1]) <= n - 1


# ============================================================================================
# Images: digits
# ============================================================================================


@pytest.fixture(scope="module")
def digits() -> ImageDataModule:
    dm = ImageDataModule(batch_size=32, val_fraction=0.2, seed=0)
    dm.setup()
    return dm


def _stack(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def test_digits_attributes_before_setup() -> None:
    dm = ImageDataModule()
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 8)
    assert dm.train_dataset is None  # nothing loaded yet
    assert ImageDataModule(image_size=16).image_size == 16


def test_digits_sizes_shapes_and_normalisation(digits: ImageDataModule) -> None:
    train, val = digits.train_dataset, digits.val_dataset
    assert train is not None and val is not None
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) <= 10  # per-class rounding
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    xs, ys = _stack(train)
    assert set(ys.tolist()) == set(range(10))
    assert set(_stack(val)[1].tolist()) == set(range(10))  # stratified: every class in val
    mean = xs.mean(dim=(0, 2, 3))
    std = xs.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(1), atol=1e-4)
    assert torch.allclose(std, torch.ones(1), atol=1e-4)
    # Raw pixel statistics are those of 0..16 digits, not already-normalised data.
    assert digits.mean is not None and 3.0 < float(digits.mean[0]) < 7.0
    xb, yb = next(iter(digits.train_dataloader()))
    assert xb.shape == (32, 1, 8, 8) and yb.shape == (32,)


def test_digits_split_deterministic_and_disjoint() -> None:
    labels = np.repeat(np.arange(10), 20)
    a_train, a_val = stratified_split(labels, 0.25, seed=3)
    b_train, b_val = stratified_split(labels, 0.25, seed=3)
    c_train, c_val = stratified_split(labels, 0.25, seed=4)
    assert np.array_equal(a_val, b_val) and np.array_equal(a_train, b_train)
    assert not np.array_equal(a_val, c_val)
    assert np.intersect1d(a_train, a_val).size == 0
    assert np.array_equal(np.sort(np.concatenate([a_train, a_val])), np.arange(200))
    assert np.all(np.bincount(labels[a_val], minlength=10) == 5)

    d1, d2 = ImageDataModule(seed=7), ImageDataModule(seed=7)
    d1.setup()
    d2.setup()
    assert d1.val_dataset is not None and d2.val_dataset is not None
    assert torch.equal(d1.val_dataset.images, d2.val_dataset.images)
    assert torch.equal(d1.val_dataset.labels, d2.val_dataset.labels)
    b1 = next(iter(d1.train_dataloader()))[1]
    b2 = next(iter(d2.train_dataloader()))[1]
    assert torch.equal(b1, b2)


def test_image_argument_validation() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        ImageDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataModule(batch_size=0)
    with pytest.raises(ValueError, match="image_size"):
        ImageDataModule(image_size=0)


# ============================================================================================
# Images: CIFAR-10 (tiny fake in the real python-pickle format)
# ============================================================================================

N_PER_BATCH = 20
CIFAR_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
]


def _write_fake_cifar(root: Path, protocol: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write data_batch_1..5, test_batch and batches.meta like the official archive."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(N_PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=N_PER_BATCH)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        with (root / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        written[name] = (data, labels)
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    with (root / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return written


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_loads_real_format(tmp_path: Path, protocol: int) -> None:
    root = tmp_path / "cifar-10-batches-py"
    written = _write_fake_cifar(root, protocol)
    dm = ImageDataModule(path=str(root), batch_size=8)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    assert dm.classes == CIFAR_CLASSES
    dm.setup()
    assert dm.train_dataset is not None and dm.val_dataset is not None
    assert len(dm.train_dataset) == 5 * N_PER_BATCH and len(dm.val_dataset) == N_PER_BATCH
    # CHW layout: the first 1024 bytes of a row are the red plane.
    data, labels = written["data_batch_1"]
    raw = dm.train_dataset.images[0]
    assert raw.shape == (3, 32, 32) and raw.dtype == torch.uint8
    assert np.array_equal(raw[0].numpy().ravel(), data[0, :1024])
    assert np.array_equal(raw[2].numpy().ravel(), data[0, 2048:])
    assert dm.val_dataset.labels.tolist() == written["test_batch"][1]
    assert dm.train_dataset.labels[:N_PER_BATCH].tolist() == labels
    xs, _ = _stack(dm.train_dataset)
    assert xs.shape == (100, 3, 32, 32)
    assert torch.allclose(xs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(xs.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    # The parent of cifar-10-batches-py/ is accepted too.
    assert ImageDataModule(path=str(tmp_path)).num_classes == 10


def test_cifar10_resize(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    dm = ImageDataModule(path=str(tmp_path), image_size=16, batch_size=4)
    assert dm.image_size == 16
    dm.setup()
    assert dm.train_dataset is not None
    assert dm.train_dataset[0][0].shape == (3, 16, 16)


def test_cifar10_missing_file(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.*batches.meta") as info:
        ImageDataModule(path=str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_cifar10_corrupt_pickle(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"\x80\x02this is not a pickle")
    dm = ImageDataModule(path=str(tmp_path))
    with pytest.raises(ValueError, match="not a valid CIFAR-10 python batch file") as info:
        dm.setup()
    assert "data_batch_2" in str(info.value)

    truncated = tmp_path / "test_batch"
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ValueError, match="test_batch.*not a valid CIFAR-10"):
        load_cifar10_batch(truncated)

    (tmp_path / "batches.meta").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="batches.meta"):
        ImageDataModule(path=str(tmp_path))


def test_cifar10_unpickler_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # would run os.system on a plain pickle.load
            import os

            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil"
    bad.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load global") as info:
        load_cifar10_batch(bad)
    assert "evil" in str(info.value)


# ============================================================================================
# Images: class folders
# ============================================================================================

FOLDER_CLASSES = ["circle", "square", "triangle"]


def _write_pngs(root: Path, per_class: int, size: tuple[int, int] = (12, 12)) -> None:
    for c, name in enumerate(FOLDER_CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color = (40 * c + i, 100 + 10 * c, 255 - 20 * i)
            Image.new("RGB", size, color).save(d / f"{i:03d}.png")


def test_folder_seeded_split(tmp_path: Path) -> None:
    _write_pngs(tmp_path, per_class=5)
    dm = ImageDataModule(path=str(tmp_path), batch_size=2, val_fraction=0.2, seed=1)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (3, 3, 12)
    assert dm.classes == FOLDER_CLASSES
    dm.setup()
    assert dm.train_dataset is not None and dm.val_dataset is not None
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 3  # 1 per class held out
    assert sorted(dm.val_dataset.labels.tolist()) == [0, 1, 2]
    x, y = dm.train_dataset[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, _ = _stack(dm.train_dataset)
    assert torch.allclose(xs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)

    again = ImageDataModule(path=str(tmp_path), val_fraction=0.2, seed=1)
    again.setup()
    assert again.val_dataset is not None
    assert torch.equal(again.val_dataset.images, dm.val_dataset.images)


def test_folder_with_train_val_and_resize(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", per_class=4, size=(20, 10))
    _write_pngs(tmp_path / "val", per_class=2, size=(20, 10))
    with pytest.raises(ValueError, match="not square.*image_size"):
        ImageDataModule(path=str(tmp_path))
    dm = ImageDataModule(path=str(tmp_path), image_size=6, batch_size=4)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (3, 3, 6)
    dm.setup()
    assert dm.train_dataset is not None and dm.val_dataset is not None
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 6
    assert dm.train_dataset[0][0].shape == (3, 6, 6)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 6, 6) and yb.dtype == torch.int64

    gray = ImageDataModule(path=str(tmp_path), image_size=6, grayscale=True)
    assert gray.in_channels == 1
    gray.setup()
    assert gray.train_dataset is not None and gray.train_dataset[0][0].shape == (1, 6, 6)


def test_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        ImageDataModule(path=str(missing))

    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (4, 4)).save(loose / "a.png")
    with pytest.raises(ValueError, match="one sub-directory per class") as info:
        ImageDataModule(path=str(loose))
    assert str(loose) in str(info.value) and "CIFAR-10" in str(info.value)

    empty_class = tmp_path / "empty_class"
    _write_pngs(empty_class, per_class=2)
    (empty_class / "zebra").mkdir()
    (empty_class / "zebra" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="zebra.*no image files"):
        ImageDataModule(path=str(empty_class))

    mixed = tmp_path / "mixed"
    _write_pngs(mixed, per_class=3)
    Image.new("RGB", (5, 5)).save(mixed / "circle" / "999.png")
    dm = ImageDataModule(path=str(mixed), batch_size=1)
    with pytest.raises(ValueError, match="999.png.*image_size"):
        dm.setup()

    corrupt = tmp_path / "corrupt"
    _write_pngs(corrupt, per_class=3)
    (corrupt / "square" / "bad.png").write_bytes(b"not a png")
    dm = ImageDataModule(path=str(corrupt), batch_size=1)
    with pytest.raises(ValueError, match="bad.png"):
        dm.setup()

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="file.txt.*directory"):
        ImageDataModule(path=str(a_file))

    small = tmp_path / "small"
    _write_pngs(small, per_class=2)
    dm = ImageDataModule(path=str(small), batch_size=64)
    dm.setup()
    with pytest.raises(ValueError, match="batch_size"):
        dm.train_dataloader()
