"""LoRA: low-rank updates on chosen projections; the base weights stay frozen (Hu et al., 2021).

Two variants share the module: DoRA (Liu et al., 2024) splits each adapted weight into magnitude and direction and
trains both; QLoRA (Dettmers et al., 2023) keeps the frozen base in 4-bit NF4 and trains the adapters on top.
"""

from __future__ import annotations

import importlib.util

import torch
from pydantic import Field

from tailor.errors import TailorError
from tailor.methods.registry import Method, MethodOptions, register, require_modules


class LoraOptions(MethodOptions):
    r: int = Field(16, gt=0, description="Rank of the update matrices.")
    alpha: int = Field(32, gt=0, description="Scale; the update is multiplied by alpha / r.")
    # default 0: on CPU the dropout masks (bernoulli) cost ~25% of a LoRA step, measured on SmolLM2-135M
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    targets: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                               description="Module names to adapt.")
    use_dora: bool = Field(False, description="DoRA: also train a per-output magnitude (slower steps, often closer "
                                              "to full fine-tuning at low rank).")
    quantize_4bit: bool = Field(False, description="QLoRA: load the frozen base in 4-bit NF4 (needs a CUDA GPU and "
                                                   "the bitsandbytes package).")


def load_options(options: LoraOptions) -> dict:
    """Extra `from_pretrained` arguments: 4-bit NF4 quantization of the base for QLoRA."""
    if not options.quantize_4bit:
        return {}
    missing = [what for what, ok in (("no CUDA GPU is visible", torch.cuda.is_available()),
                                     ("the bitsandbytes package is not installed",
                                      importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if missing:
        raise TailorError("methods.lora.quantize_4bit: QLoRA needs a CUDA GPU and the bitsandbytes package; "
                          f"here {' and '.join(missing)}. Set methods.lora.quantize_4bit: false to train LoRA on "
                          "the full-precision base.")
    from transformers import BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    # 4-bit weights cannot be moved with .to(): they are placed on the GPU while loading
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def prepare(model, options: LoraOptions):
    """Wrap the base model so that only the low-rank updates train."""
    import peft  # imported here: it costs seconds, and loading a config must stay fast
    require_modules(model, options.targets, "methods.lora.targets")
    if options.quantize_4bit:
        # casts norms to fp32 and enables input gradients; gradient checkpointing stays the training core's choice
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                             target_modules=options.targets, use_dora=options.use_dora, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


register(Method(name="lora", options=LoraOptions, prepare=prepare, load_options=load_options, artifact="adapter",
                summary="Low-rank adapters on chosen projections (DoRA, QLoRA options); base weights frozen."))
