"""LoRA: low-rank updates on chosen projections; the base weights stay frozen (Hu et al., 2021)."""

from __future__ import annotations

import peft
from pydantic import Field

from tailor.errors import TailorError
from tailor.methods.registry import Method, MethodOptions, register


class LoraOptions(MethodOptions):
    r: int = Field(16, gt=0, description="Rank of the update matrices.")
    alpha: int = Field(32, gt=0, description="Scale; the update is multiplied by alpha / r.")
    # default 0: on CPU the dropout masks (bernoulli) cost ~25% of a LoRA step, measured on SmolLM2-135M
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    targets: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                               description="Module names to adapt.")


def prepare(model, options: LoraOptions):
    """Wrap the base model so that only the low-rank updates train."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in options.targets if t not in present]
    if missing:
        raise TailorError(f"methods.lora.targets: the model has no module named {', '.join(missing)} "
                          f"(it has e.g. {', '.join(sorted(present - {''})[:8])})")
    config = peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                             target_modules=options.targets, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


register(Method(name="lora", options=LoraOptions, prepare=prepare, trains=True, artifact="adapter",
                summary="Low-rank adapters on chosen projections; base weights frozen."))
