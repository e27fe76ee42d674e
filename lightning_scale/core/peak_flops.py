"""Peak dense FLOP/s of accelerators, for MFU. Torch only (no torch import needed at all).

One row per (device, dtype), each with its datasheet source (design guide section 7). Devices
are matched by the **exact** name ``torch.cuda.get_device_name()`` reports, listed per row;
never by substring (matching "L4" inside "L40S" would report 3x the real MFU). An unknown
device has no peak: MFU is then omitted with a warning, unless the user gives the peak.

Figures are dense (no 2:4 sparsity), tensor-core where the dtype has them. The device name
strings are the ones NVIDIA / AMD drivers report for these boards; none of them could be checked
on this project's machines (no GPU), so an unmatched real device falls back to "unknown". This
holds for the H100 NVL, GH200 and B200 rows too: their names ("NVIDIA H100 NVL", "NVIDIA GH200
480GB", "NVIDIA GH200 144G HBM3e", "NVIDIA B200", ...) were written from the names these
boards are known to report, and were not verified on hardware either. The
callbacks' warnings name the reported device and the option that names its row by hand
(``ScaleProfiler(device=...)``, ``CostReporter(gpu=...)``; :func:`known_devices`).
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("fp8", "bf16", "fp16", "tf32", "fp32")


@dataclass(frozen=True)
class PeakFlops:
    device: str  # canonical name
    names: tuple[str, ...]  # exact names reported by torch.cuda.get_device_name()
    tflops: dict[str, float]  # dtype -> dense peak TFLOP/s
    memory_gb: tuple[float, ...]  # board memory sizes, GB
    source: str


PEAKS: tuple[PeakFlops, ...] = (
    PeakFlops("V100 SXM2", ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"), {"fp16": 125.0, "fp32": 15.7}, (16, 32),
              "NVIDIA Tesla V100 datasheet (SXM2): 125 TFLOPS tensor, 15.7 TFLOPS FP32"),
    PeakFlops("A100", ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"),
              {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, (40, 80),
              "NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312, TF32 156, FP32 19.5 TFLOPS (dense)"),
    PeakFlops("H100 SXM", ("NVIDIA H100 80GB HBM3",), {"fp8": 1979.0, "bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
              (80,), "NVIDIA H100 Tensor Core GPU datasheet (SXM5), dense = half the sparse figures"),
    PeakFlops("H100 PCIe", ("NVIDIA H100 PCIe",), {"bf16": 756.0, "fp16": 756.0}, (80,),
              "NVIDIA H100 Tensor Core GPU datasheet (PCIe), dense"),
    PeakFlops("H100 NVL", ("NVIDIA H100 NVL",), {"fp8": 1670.5, "bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
              (94,), "NVIDIA H100 Tensor Core GPU datasheet (H100 NVL column): FP8 3,341, BF16/FP16 1,671, TF32 835 "
              "TFLOPS with sparsity (dense = half), FP32 60 TFLOPS; 94 GB HBM3"),
    PeakFlops("GH200", ("NVIDIA GH200 480GB", "NVIDIA GH200 144G HBM3e", "NVIDIA GH200 120GB"),
              {"fp8": 1979.0, "bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}, (96, 144),
              "NVIDIA GH200 Grace Hopper Superchip datasheet (GPU): FP8 3,958, BF16/FP16 1,979, TF32 989 TFLOPS "
              "with sparsity (dense = half), FP32 67 TFLOPS, the H100 SXM's; 96 GB HBM3 or 144 GB HBM3e"),
    PeakFlops("H200 SXM", ("NVIDIA H200",), {"fp8": 1979.0, "bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
              (141,), "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column): FP8 3,958, BF16/FP16 1,979, TF32 989 "
              "TFLOPS with sparsity (dense = half), FP32 67 TFLOPS"),
    PeakFlops("B200", ("NVIDIA B200",), {"fp8": 4500.0, "bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
              (180, 192), "NVIDIA HGX B200 datasheet, per GPU: FP8 9 PF, FP16/BF16 4.5 PF, TF32 2.2 PF with sparsity "
              "(dense = half; 8 GPUs: 72 / 36 / 18 PF), FP32 75 TFLOPS (600 TFLOPS per 8 GPUs; an early GTC 2024 "
              "sheet said 80); 180 GB HBM3e per GPU on HGX/DGX B200, 192 GB on the package"),
    PeakFlops("L4", ("NVIDIA L4",), {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}, (24,),
              "NVIDIA L4 datasheet: BF16/FP16 242, TF32 120 TFLOPS with sparsity (dense = half), FP32 30.3 TFLOPS"),
    PeakFlops("L40S", ("NVIDIA L40S",), {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}, (48,),
              "NVIDIA L40S datasheet: BF16/FP16 362.05 dense (733 sparse), TF32 183 dense (366 sparse), FP32 91.6 TFLOPS"),
    PeakFlops("A10G", ("NVIDIA A10G",), {"bf16": 70.0, "fp16": 70.0}, (24,),
              "AWS EC2 G5 instance sheet (A10G); others quote 125 for the A10"),
    PeakFlops("T4", ("Tesla T4",), {"fp16": 65.0}, (16,), "NVIDIA T4 datasheet: FP16 65 TFLOPS (no bf16)"),
    PeakFlops("MI300X", ("AMD Instinct MI300X",), {"bf16": 1307.4, "fp16": 1307.4}, (192,),
              "AMD Instinct MI300X datasheet, dense"),
)

_BY_NAME = {name: row for row in PEAKS for name in row.names}
_BY_DEVICE = {row.device: row for row in PEAKS}


def dtype_key(dtype: object, allow_tf32: bool = False) -> str:
    """``torch.bfloat16`` -> "bf16", ``torch.float16`` -> "fp16", ``torch.float32`` -> "fp32" (or
    "tf32" when TF32 matmuls are enabled); strings in :data:`DTYPES` pass through."""
    text = str(dtype).removeprefix("torch.")
    key = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(text, text)
    if key == "fp32" and allow_tf32:
        key = "tf32"
    if key not in DTYPES:
        raise ValueError(f"no peak-FLOPs column for dtype {dtype!r}; one of {DTYPES}")
    return key


def precision_key(precision: object, allow_tf32: bool = False) -> str:
    """The peak-table dtype a Lightning ``precision`` computes its matmuls in: ``bf16-*`` -> "bf16",
    ``16-*`` -> "fp16", otherwise "fp32" (or "tf32" when TF32 matmuls are enabled)."""
    p = str(precision)
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    return "tf32" if allow_tf32 else "fp32"


def known_devices() -> tuple[str, ...]:
    """The table's canonical device names, in table order (what ``ScaleProfiler(device=...)`` takes)."""
    return tuple(row.device for row in PEAKS)


def lookup(device_name: str) -> PeakFlops | None:
    """The row for a device by its exact reported name (or canonical name), else None."""
    return _BY_NAME.get(device_name) or _BY_DEVICE.get(device_name)


def peak_flops(device_name: str, dtype: object, allow_tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of ``device_name`` for ``dtype``, or None if the device or dtype is not in the table."""
    row = lookup(device_name)
    if row is None:
        return None
    tflops = row.tflops.get(dtype_key(dtype, allow_tf32))
    return None if tflops is None else tflops * 1e12
