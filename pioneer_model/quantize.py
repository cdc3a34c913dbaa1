"""int8 weight-only quantization: per-output-channel symmetric int8 weights for nn.Linear and the tied head."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiHeadAttention


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row) with weight ~= int8 * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_kernel_works(device, dtype) -> bool:
    """Whether torch's int8 weight-only matmul (_weight_int8pack_mm) runs on this device and dtype."""
    try:
        x = torch.ones(2, 32, device=device, dtype=dtype)
        w = torch.ones(8, 32, device=device, dtype=torch.int8)
        out = torch._weight_int8pack_mm(x, w, torch.ones(8, device=device, dtype=dtype))
        return bool(torch.allclose(out.float(), torch.full((2, 8), 32.0, device=device)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and a float scale per output channel; activations stay in float.

    kernel "int8mm": torch._weight_int8pack_mm (reads the int8 weights directly); "dequant": converts the
    weights to the activations' dtype on each call, then a float matmul (for devices without the kernel).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "int8mm",
                 tied: bool = False):
        super().__init__()
        q, scale = quantize_weight(weight)
        if tied:  # an int8 copy of a weight the model already counts (the embedding): a buffer, not a parameter
            self.register_buffer("weight", q)
        else:
            self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = kernel
        self.in_features, self.out_features = weight.size(1), weight.size(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    Cross-attention input projections stay float: the model slices their weights directly. In place."""
    if kernel == "auto":
        kernel = "int8mm" if int8_kernel_works(model.device, model.tok_emb.weight.dtype) else "dequant"
    skip = {id(m.in_proj) for name, m in model.named_modules()
            if isinstance(m, MultiHeadAttention) and name.endswith("cross_attn")}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in skip:
                setattr(parent, name, Int8Linear(child.weight, child.bias, kernel))
    model.lm_head = Int8Linear(model.tok_emb.weight, None, kernel, tied=True)
    # AttentionModel.logits multiplies by the float embedding; this instance uses the int8 head instead.
    object.__setattr__(model, "logits", model.lm_head)
    model.quantization = "int8"
    return model
