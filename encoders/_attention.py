"""Packed varlen attention for the variable-resolution towers, through transformers' own model classes.

transformers' vision blocks attend over the whole packed batch in one kernel call only when the
configured attention name contains "flash"; sdpa/eager split by `cu_seqlens.tolist()` and attend
window by window (a host sync and ~1000 tiny kernels per layer for Qwen2.5-VL's 64-token windows).
`VARLEN_ATTENTION` is registered with transformers' `AttentionInterface` and calls PyTorch's own
flash varlen kernel (`torch.nn.attention.varlen.varlen_attn`, no extra package) on CUDA; elsewhere
it attends per sequence with sdpa, the same maths, so the plumbing is testable on a CPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# "flash" in the name is what makes transformers' vision attention pass cu_seqlens and max_seqlen
VARLEN_ATTENTION = "towerflow_flash_varlen"
# names set on the config after loading: from_pretrained would look for a flash-attn package
POST_LOAD_ATTENTION = frozenset({VARLEN_ATTENTION})
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _load_kernel() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # PyTorch < 2.10
        return None
    return varlen_attn


# resolved once at import: nothing in the per-layer path inspects modules (cheaper, and traceable)
_KERNEL = _load_kernel()
# 2.10's varlen_attn has no `scale` (it always uses 1/sqrt(head_dim)); 2.11+ has it
_KERNEL_TAKES_SCALE = _KERNEL is not None and "scale" in inspect.signature(_KERNEL).parameters


_CAPABLE: dict[int | None, bool] = {}


def _flash_capable(device_index: int | None) -> bool:
    """PyTorch's flash kernels need Ampere or newer. Memoised in a plain dict, not functools.cache:
    the check runs in every layer, and torch.compile warns on (and traces through) lru_cache wrappers."""
    if device_index not in _CAPABLE:
        ok = torch.cuda.is_available() and torch.cuda.get_device_capability(device_index) >= (8, 0)
        _CAPABLE[device_index] = ok
    return _CAPABLE[device_index]


def varlen_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the flash varlen kernel runs here: CUDA, Ampere or newer, fp16/bf16, PyTorch >= 2.10."""
    return (
        device.type == "cuda"
        and dtype in _KERNEL_DTYPES
        and _KERNEL is not None
        and _flash_capable(device.index)
    )


def default_packed_attention(device: torch.device, dtype: torch.dtype) -> str | None:
    """The packed towers' default: varlen where the kernel runs, else transformers' default (sdpa)."""
    return VARLEN_ATTENTION if varlen_supported(device, dtype) else None


def _kernel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    max_q: int, max_k: int, scaling: float,
) -> torch.Tensor:  # fmt: skip
    if _KERNEL_TAKES_SCALE:
        return _KERNEL(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling)
    default = q.shape[-1] ** -0.5
    if scaling != default:
        q = q * (scaling / default)
    return _KERNEL(q, k, v, cu_q, cu_k, max_q, max_k)


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Per-sequence sdpa on (seq, heads, dim) inputs: the fallback, and what the kernel must equal."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        qi, ki, vi = (
            x[a:b].transpose(0, 1)
            for x, a, b in (
                (q, bounds_q[i], bounds_q[i + 1]),
                (k, bounds_k[i], bounds_k[i + 1]),
                (v, bounds_k[i], bounds_k[i + 1]),
            )
        )
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scaling).transpose(0, 1))
    return torch.cat(outs, dim=0)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (1, heads, seq, dim) in, (1, seq, heads, dim) out.

    Without cu_seq_lens (a non-packed model given this name) it is plain sdpa.
    """
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            is_causal=is_causal, **kwargs,
        )  # fmt: skip
    if query.shape[0] != 1 or attention_mask is not None or dropout or is_causal:
        raise ValueError("packed varlen attention takes one packed sequence, no mask, no dropout, not causal")
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (seq, heads, dim) views
    if q.is_cuda and varlen_supported(q.device, q.dtype):
        max_q = int(max_length_q) if max_length_q is not None else int((cu_seq_lens_q.diff()).max())
        max_k = int(max_length_k) if max_length_k is not None else max_q
        out = _kernel_attention(q, k, v, cu_seq_lens_q, cu_k, max_q, max_k, scale)
    else:
        out = _reference_attention(q, k, v, cu_seq_lens_q, cu_k, scale)
    return out.unsqueeze(0), None


AttentionInterface.register(VARLEN_ATTENTION, packed_attention_forward)
