"""int8 weights: per-output-channel symmetric int8 for every nn.Linear and the tied output head."""

import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiHeadAttention

KERNELS = ("dynamic", "int8mm", "dequant")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row) with weight ~= int8 * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


@lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    try:
        return "vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def kernel_works(kernel: str, device, dtype) -> bool:
    """Whether an Int8Linear kernel runs (and is right) on this device and activation dtype."""
    try:
        layer = Int8Linear(torch.eye(32, device=device), None, kernel)
        x = torch.arange(64, device=device, dtype=dtype).view(2, 32) / 64
        return bool(torch.allclose(layer(x).float(), x.float(), atol=0.02))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def choose_kernel(device, dtype) -> str:
    """On this project's CPUs torch's weight-only int8 kernels are slower than fp32 (benchmarks/quantize.py),
    so the CPU uses its int8 GEMM; a GPU uses the weight-only int8 matmul; "dequant" works everywhere."""
    preferred = ("dynamic", "dequant") if torch.device(device).type == "cpu" else ("int8mm", "dequant")
    return next(k for k in preferred if k == "dequant" or kernel_works(k, device, dtype))


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and a float scale per output channel; activations stay in float.

    kernel "dequant": converts the weights to the activations' dtype on each call, then a float matmul (weight-
    only, any device). "int8mm": torch._weight_int8pack_mm (weight-only, reads the int8 weights directly).
    "dynamic" (CPU): torch's int8 GEMM (quantized.linear_dynamic, FBGEMM/oneDNN), which also rounds each input
    to int8 with a per-tensor scale chosen on the fly.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "dequant",
                 tied: bool = False):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
        q, scale = quantize_weight(weight)
        if tied:  # an int8 copy of a weight the model already counts (the embedding): a buffer, not a parameter
            self.register_buffer("weight", q)
        else:
            self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.kernel = kernel
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        self._packed = None

    def packed(self):
        """The weights packed for the CPU's int8 GEMM (built on first use)."""
        if self._packed is None:
            with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated
                warnings.simplefilter("ignore")
                zero = torch.zeros(self.out_features, dtype=torch.long)
                q = torch.quantize_per_channel(self.weight.float() * self.scale[:, None], self.scale.double(), zero,
                                               0, torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(q, self.bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dynamic":
            # 7-bit inputs avoid int16 overflow in the int8 GEMM of CPUs without VNNI
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed(), not cpu_has_vnni()).to(x.dtype)
        if self.kernel == "int8mm":
            scale = self.scale if x.dtype == torch.float32 else self.scale.to(x.dtype)
            out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, scale)
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@torch.no_grad()
def quantize_int8(model: nn.Module, kernel: str = "auto") -> nn.Module:
    """Swap every nn.Linear of an AttentionModel for an Int8Linear and give it an int8 output head (the tied
    embedding, quantized per vocabulary row); the token embedding itself stays float for lookups.
    Cross-attention input projections stay float: the model slices their weights. In place; move first."""
    if kernel == "auto":
        kernel = choose_kernel(model.device, model.tok_emb.weight.dtype)
    skip = {id(m.in_proj) for name, m in model.named_modules()
            if isinstance(m, MultiHeadAttention) and name.endswith("cross_attn")}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in skip:
                setattr(parent, name, Int8Linear(child.weight, child.bias, kernel))
    model.lm_head = Int8Linear(model.tok_emb.weight, None, kernel, tied=True)
    # AttentionModel.logits multiplies by the float embedding; this instance uses the int8 head instead.
    object.__setattr__(model, "logits", model.lm_head)
    model.quantization = f"int8-{kernel}"
    return model
