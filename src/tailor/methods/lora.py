"""LoRA: low-rank updates on chosen projections; the base weights stay frozen (Hu et al., 2021).

Two variants share the module: DoRA (Liu et al., 2024) splits each adapted weight into magnitude and direction and
trains both; QLoRA (Dettmers et al., 2023) keeps the frozen base in 4-bit NF4 and trains the adapters on top.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator

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


def load_options(options: LoraOptions, key: str = "methods.lora") -> dict:
    """Extra `from_pretrained` arguments: 4-bit NF4 quantization of the base for QLoRA (`key`: where the options
    sit in tailor.yaml, for the error)."""
    if not options.quantize_4bit:
        return {}
    missing = [what for what, ok in (("no CUDA GPU is visible", torch.cuda.is_available()),
                                     ("the bitsandbytes package is not installed",
                                      importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if missing:
        raise TailorError(f"{key}.quantize_4bit: QLoRA needs a CUDA GPU and the bitsandbytes package; "
                          f"here {' and '.join(missing)}. Set {key}.quantize_4bit: false to train LoRA on "
                          "the full-precision base.")
    from transformers import BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    # 4-bit weights cannot be moved with .to(): they are placed on the GPU while loading
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def lora_config(options: LoraOptions):
    """The one place tailor's LoRA options become a `peft.LoraConfig`: every method that trains LoRA builds it here."""
    import peft  # imported here: it costs seconds, and loading a config must stay fast

    return peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                           target_modules=options.targets, use_dora=options.use_dora, task_type="CAUSAL_LM")


def prepare(model, options: LoraOptions, key: str = "methods.lora"):
    """Wrap the base model so that only the low-rank updates train (`key`: where the options sit in tailor.yaml)."""
    import peft

    require_modules(model, options.targets, f"{key}.targets")
    if options.quantize_4bit:
        # casts norms to fp32 and enables input gradients; gradient checkpointing stays the training core's choice
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, lora_config(options))


# written directly under a method before its LoRA options nested under `lora` (methods.dpo.r); still accepted
SHORTHAND = ("r", "alpha", "targets")


class UsesLora(MethodOptions):
    """Base of the options of a method that trains LoRA adapters as one part of its work (dpo, ppo, reward, distill,
    continued_pretraining): `lora` holds the options of methods.lora, declared once above.

    `r`, `alpha` and `targets` written directly under the method (how these methods took them before) still mean
    `lora.r`, `lora.alpha` and `lora.targets`. These methods load their base in full precision themselves, so
    `lora.quantize_4bit` is refused rather than ignored.
    """

    # a method's own defaults for `lora.*` where they differ from methods.lora's (a user's values override them)
    lora_defaults: ClassVar[dict[str, Any]] = {}
    lora: LoraOptions = Field(default_factory=LoraOptions, description=(
        "LoRA adapters, with the options of methods.lora (r, alpha, dropout, targets, use_dora); "
        "r, alpha and targets may also be written directly under the method."))

    @model_validator(mode="before")
    @classmethod
    def _nest_shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        flat = {key: data.pop(key) for key in SHORTHAND if key in data}
        nested = data.get("lora", {})
        if isinstance(nested, LoraOptions):
            nested = nested.model_dump(exclude_unset=True)
        if not isinstance(nested, dict):
            return data  # pydantic names the wrong type
        both = sorted(set(flat) & set(nested))
        if both:
            raise ValueError(f"'{both[0]}' and 'lora.{both[0]}' are the same option; write one of them")
        data["lora"] = {**cls.lora_defaults, **nested, **flat}
        return data

    @field_validator("lora")
    @classmethod
    def _full_precision_base(cls, lora: LoraOptions) -> LoraOptions:
        if lora.quantize_4bit:
            raise ValueError("quantize_4bit is for methods.lora and methods.raft only; this method loads its base "
                             "in full precision")
        return lora

    @classmethod
    def option_keys(cls) -> list[str]:
        return [*super().option_keys(), *SHORTHAND]


register(Method(name="lora", options=LoraOptions, prepare=prepare, load_options=load_options, artifact="adapter",
                summary="Low-rank adapters on chosen projections (DoRA, QLoRA options); base weights frozen."))
