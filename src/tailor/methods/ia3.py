"""IA3: learned per-channel scales on keys, values and the feed-forward input; base weights frozen (Liu et al., 2022).

Fewer trainable numbers than LoRA by two orders of magnitude (one vector per adapted projection), at some cost in
how much the model can change.
"""

from __future__ import annotations

from pydantic import Field

from tailor.errors import TailorError
from tailor.methods.registry import Method, MethodOptions, register, require_modules


class Ia3Options(MethodOptions):
    targets: list[str] = Field(["k_proj", "v_proj", "down_proj"],
                               description="Module names whose activations are rescaled (Llama-style names).")
    feedforward: list[str] = Field(["down_proj"], description=(
        "Those of `targets` in the feed-forward block: their input is scaled instead of their output."))


def prepare(model, options: Ia3Options):
    """Wrap the base model so that only the scaling vectors train."""
    import peft  # imported here: it costs seconds, and loading a config must stay fast
    require_modules(model, options.targets, "methods.ia3.targets")
    outside = [name for name in options.feedforward if name not in options.targets]
    if outside:
        raise TailorError(f"methods.ia3.feedforward: {', '.join(outside)} must also be listed in methods.ia3.targets")
    config = peft.IA3Config(target_modules=options.targets, feedforward_modules=options.feedforward,
                            task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


register(Method(name="ia3", options=Ia3Options, prepare=prepare, artifact="adapter",
                summary="Learned per-channel scales on keys, values and feed-forward input; base weights frozen."))
