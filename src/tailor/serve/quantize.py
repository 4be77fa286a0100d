"""Weight-only int8 and int4 linear layers for decoding on a CPU (`serve.quantize`).

A decoding step of one row reads every weight once and does little arithmetic with it: on this 2-core machine,
bf16, the default model's projections and its 49k-word output layer take about 65 % of a step, at the speed memory
delivers their 270 MB. Fewer bytes per weight is the way to a faster step, and PyTorch ships the kernels:
`aten._weight_int8pack_mm` (int8 weights, one scale per output channel) and `aten._weight_int4pack_mm_for_cpu`
(int4 weights in groups of 32 along the input, a scale and an offset per group: the layout of llama.cpp's Q4_1).
torchao's Int8WeightOnlyConfig / Int4WeightOnlyConfig(Int4CPULayout) call the same two kernels on a CPU; we call
them directly rather than add torchao as a dependency, and because of the one thing this module adds: the kernels
are built for a few rows at a time and are 2-4x slower than the bf16 matrix product from about 32 rows on (1
thread: 128 rows, int8 2.2 ms vs bf16 0.55 ms per up_proj; 1,000 rows 11.3 vs 3.6 ms), so a prefill dequantizes
the layer's weight and runs the ordinary product (1,000 rows: 3.8 ms). The path is chosen by positions per row, not
by rows in all: a decoding step (one position per row, up to 1 + serve.speculative_tokens for a lone row) takes the
kernel whatever the batch size, a prompt of more positions the dequantized product. Both kernels compute each row
alone (checked in tests), so a request's tokens do not depend on the batch it decodes in.

`QuantizedLinear` subclasses nn.Linear so that PEFT wraps it for LoRA like any linear layer (PEFT only calls it);
its `weight` is None and the codes live in `qweight`, where PEFT looks for a quantized layer's device.
"""

from __future__ import annotations

import torch
from torch import nn

from tailor.errors import TailorError

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP = 32  # input columns sharing one scale and offset, as in llama.cpp's Q4_1
# positions per row up to which the int kernels run (a decoding step, speculation included); longer inputs are
# prompts. 1 thread, up_proj, rows in all: at 16, int8 0.20 ms, int4 0.17 ms, dequantize + bf16 about 0.30 ms; at
# 128 the kernels are 3x slower than dequantizing
KERNEL_POSITIONS = 8


class QuantizedLinear(nn.Linear):
    """A linear layer whose weight [out, in] is stored as int8 codes with a scale per output row, or as int4 codes
    with a scale and a minimum per group of 32 inputs. Computes in the input's dtype."""

    # buffers, registered in __init__ (int8: qweight and scale; int4: qweight, nibbles and scale_and_zero)
    qweight: torch.Tensor
    scale: torch.Tensor
    nibbles: torch.Tensor
    scale_and_zero: torch.Tensor

    def __init__(self, linear: nn.Linear, bits: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.register_parameter("weight", None)
        self.bias = linear.bias
        weight = linear.weight.detach().float()  # [out, in]
        dtype = linear.weight.dtype
        if bits == 8:
            scale = weight.abs().amax(1).clamp(min=1e-8) / 127  # [out]
            self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.to(dtype))
            return
        out_features, in_features = weight.shape
        groups = weight.view(out_features, in_features // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)  # [out, groups]
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
        codes = codes.view(out_features, in_features)
        # the kernel's format (blocked for its vector units) plus the same codes two per byte in plain order, which
        # the dequantizing path can unpack: the kernel's format is not documented
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 8))
        self.register_buffer("nibbles", codes[:, 0::2] | (codes[:, 1::2] << 4))  # [out, in / 2]
        # the kernel reads w = (code - 8) * scale + zero per group: zero = low + 8 * scale
        self.register_buffer("scale_and_zero", torch.stack([scale, low + 8 * scale], -1)
                             .transpose(0, 1).contiguous().to(dtype))  # [groups, out, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = x.shape[-2] if x.dim() > 2 else x.shape[0]
        if positions > KERNEL_POSITIONS:
            return nn.functional.linear(x, self.dequantized(x.dtype), self.bias)
        flat = x.reshape(-1, self.in_features).contiguous()  # [rows * positions, in]; the int4 kernel needs it
        if self.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale.to(x.dtype))
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, INT4_GROUP,
                                                             self.scale_and_zero.to(x.dtype))
        out = out.view(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] the codes stand for, in `dtype`."""
        if self.bits == 8:
            return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]
        codes = torch.stack([self.nibbles & 15, self.nibbles >> 4], -1).view(self.out_features, -1, INT4_GROUP)
        scale, zero = self.scale_and_zero.float().transpose(0, 1).unbind(-1)  # [out, groups] each
        return ((codes.float() - 8) * scale[..., None] + zero[..., None]).view(self.out_features, -1).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}"


def quantize_linears(model: nn.Module, quantize: str) -> nn.Module:
    """Replace every nn.Linear of `model` (its projections and its output layer) with a QuantizedLinear, in place;
    `quantize` is "int8", "int4" or "none". The input embeddings stay as they are (a lookup reads one row)."""
    if quantize not in QUANTIZATIONS:
        raise TailorError(f"serve.quantize: must be one of {', '.join(QUANTIZATIONS)} (found {quantize!r})")
    if quantize == "none":
        return model
    if next(model.parameters()).device.type != "cpu":
        raise TailorError(f"serve.quantize: {quantize} uses PyTorch's CPU kernels; on a GPU serve with "
                          f"serve.quantize: none (or serve.engine: vllm)")
    bits = 8 if quantize == "int8" else 4
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            if bits == 4 and (child.in_features % INT4_GROUP or child.out_features % 16):
                raise TailorError(f"serve.quantize: int4 needs layers whose inputs are a multiple of {INT4_GROUP} "
                                  f"and outputs a multiple of 16; {name} is {child.in_features} -> "
                                  f"{child.out_features}; use int8")
            setattr(parent, name, QuantizedLinear(child, bits))
    return model
