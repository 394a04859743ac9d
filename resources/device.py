"""Device and dtype resolution: CUDA > MPS > CPU unless the run says otherwise."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class DeviceError(ValueError):
    """A requested device or dtype cannot be used on this machine."""


def available_devices() -> list[str]:
    """Devices usable in this process, best first (always ends with ``cpu``)."""
    found: list[str] = []
    if torch.cuda.is_available():
        found.extend(f"cuda:{i}" for i in range(torch.cuda.device_count()))
        found.insert(0, "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def resolve_device(requested: str | None = "auto") -> torch.device:
    """Turn ``auto`` / ``cuda`` / ``cuda:1`` / ``mps`` / ``cpu`` into a usable ``torch.device``.

    ``auto`` picks CUDA, then MPS, then CPU. Asking for a device that is not present is an error that
    lists what is available; there is no silent fallback.
    """
    name = (requested or "auto").strip().lower()
    options = available_devices()
    if name == "auto":
        return torch.device(options[0])
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise DeviceError(f"Unknown device {requested!r}. Use one of: auto, {', '.join(options)}.")
    if name not in options:
        raise DeviceError(
            f"Device {requested!r} is not available on this machine. Available: {', '.join(options)}. "
            "Set device to 'auto' or to one of these."
        )
    return torch.device(name)


def resolve_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """``auto`` means float32 on CPU and MPS, bfloat16 on CUDA; otherwise a name from ``DTYPES``."""
    name = (requested or "auto").strip().lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"Unknown dtype {requested!r}. Use one of: auto, {', '.join(sorted(DTYPES))}.")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise DeviceError("dtype float16 is not supported for CPU inference here; use float32 or bfloat16.")
    return dtype
