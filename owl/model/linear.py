"""`Linear`: nn.Linear whose fp32 CPU products run through oneDNN instead of torch's BLAS where
that is the faster of the two.

Every linear layer of the model (vision encoder, abstractor, decoder) is this class. Which library
is faster at the model's shapes depends on the CPU (measured on an AMD EPYC and an Intel Xeon:
BENCHMARKS.md, "Model" and "Within 10 minutes"): oneDNN on the AMD, MKL on the Intel (AVX-512,
AMX). MKL is Intel's library, so on an Intel CPU `Linear` is F.linear (MKL), elsewhere oneDNN;
the choice is made once per process (`PREFER_ONEDNN`), so a machine's numbers stay
deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys, optional bias) whose fp32 products on CPU
    run through oneDNN rather than MKL: the forward product and both backward ones, the same values
    up to float rounding; the bias gradient is the output gradient summed over rows, as autograd
    computes it for F.linear. On an Intel CPU (`PREFER_ONEDNN` False), for small products, on GPU,
    in bf16, under CPU autocast or with mkldnn disabled (torch.backends.mkldnn.flags) it is
    nn.Linear. peft wraps it as any nn.Linear (isinstance), so LoRA bases run through it too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            PREFER_ONEDNN
            and _HAS_ONEDNN
            and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")
            and x.numel() * weight.shape[0] >= _ONEDNN_MIN_MACS
        ):
            return _OneDNNLinear.apply(x, weight, self.bias)
        return F.linear(x, weight, self.bias)


class _OneDNNLinear(torch.autograd.Function):
    """x (..., in) @ weight.T (in, out) + bias (out,) or None, forward and backward through
    oneDNN."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        # Keep only what the backward needs, as autograd does for F.linear (frozen LoRA bases).
        grad_x, grad_weight, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if grad_weight else None, weight if grad_x else None)
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    def backward(
        ctx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        # oneDNN reorders a second operand of other strides than a weight's (or its transpose's)
        # through a slow generic path: an expanded gradient (of `out.sum()`) or a strided input
        # is made contiguous first (no copy when it already is).
        grad = grad.contiguous()
        grad_rows = grad.view(-1, grad.shape[-1])  # (N, out)
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul(grad, weight.t())  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            # grad.T @ x over all N rows -> (out, in). oneDNN copies its first operand to
            # contiguous (here a transpose), so the narrower of grad.T and x.T goes first.
            x_rows = x.reshape(-1, x.shape[-1]).contiguous()
            if grad_rows.shape[1] <= x_rows.shape[1]:
                grad_weight = _onednn_matmul(grad_rows.t(), x_rows.t())
            else:
                grad_weight = _onednn_matmul(x_rows.t(), grad_rows.t()).t()
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)  # (out,)
        return grad_x, grad_weight, grad_bias


def _onednn_matmul(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """a (..., k) @ b.T (+ bias) for b (n, k) of any strides: oneDNN's linear, the op Inductor's CPU
    backend emits for nn.Linear (private to torch, hence `_HAS_ONEDNN` and the fallback)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)
# Below ~2M multiply-adds a oneDNN call's fixed overhead outweighs its speed, so MKL runs those
# (e.g. a cached decode step's one token per row). It must stay >= 1: oneDNN rejects an empty input
# (a text-only training batch runs the image path on zero images).
_ONEDNN_MIN_MACS = 1 << 21


def cpu_vendor(cpuinfo: str | None = None) -> str:
    """The CPU's vendor id (`GenuineIntel`, `AuthenticAMD`, ...) from /proc/cpuinfo (or the text
    `cpuinfo`), or "" where there is none (not Linux, or not x86). The file is read only up to the
    first CPU's vendor_id: on a many-core machine the kernel writes the rest (every CPU's entry)
    only if it is read, and this runs at import in every process."""
    if cpuinfo is not None:
        return _vendor_id(cpuinfo.splitlines())
    try:
        with open("/proc/cpuinfo", errors="replace") as lines:
            return _vendor_id(lines)
    except OSError:
        return ""


def _vendor_id(lines: Iterable[str]) -> str:
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


# Whether fp32 CPU products go through oneDNN: everywhere but on Intel CPUs, where torch's BLAS
# (MKL) is the faster (module docstring). Benchmarks and tests set it to time or test either path.
PREFER_ONEDNN = cpu_vendor() != "GenuineIntel"
