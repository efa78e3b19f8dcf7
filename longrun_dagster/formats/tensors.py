"""Dicts of torch tensors or numpy arrays <-> safetensors bytes (no code on load)."""

from typing import Any

import numpy as np

FORMAT_TORCH = "safetensors-torch"
FORMAT_NUMPY = "safetensors-numpy"
EXTENSION = "safetensors"


def is_tensor_dict(obj: object) -> bool:
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return False
    return all(_is_torch(v) for v in obj.values()) or all(
        isinstance(v, np.ndarray) for v in obj.values()
    )


def _is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def dumps(tensors: dict[str, Any]) -> tuple[str, bytes]:
    if all(_is_torch(v) for v in tensors.values()):
        from safetensors.torch import save

        return FORMAT_TORCH, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    from safetensors.numpy import save as save_np

    return FORMAT_NUMPY, save_np({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def loads(format_name: str, data: bytes) -> dict[str, Any]:
    if format_name == FORMAT_TORCH:
        from safetensors.torch import load

        return load(data)
    from safetensors.numpy import load as load_np

    return load_np(data)
