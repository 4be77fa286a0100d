"""Full fine-tuning: every weight trains, optionally with the embeddings and the first N decoder layers frozen.

The costliest method: the optimizer holds two fp32 moments per weight, and the artifact is a whole model.
"""

from __future__ import annotations

from pydantic import Field

from tailor.errors import TailorError
from tailor.methods.registry import Method, MethodOptions, register


class FullOptions(MethodOptions):
    freeze_layers: int = Field(0, ge=0, description=(
        "Freeze the token embeddings and the first N decoder layers (0: every weight trains). Lower layers hold "
        "general features; freezing them saves memory and guards against forgetting."))


def prepare(model, options: FullOptions):
    """Make every weight trainable, except the embeddings and the first `freeze_layers` layers when asked."""
    layers = model.get_decoder().layers
    if options.freeze_layers > len(layers):
        raise TailorError(f"methods.full.freeze_layers: the model has {len(layers)} decoder layers "
                          f"(found {options.freeze_layers})")
    model.requires_grad_(True)
    if options.freeze_layers:
        # with tied input/output embeddings (SmolLM2) this also freezes the output projection: it is the same tensor
        model.get_input_embeddings().requires_grad_(False)
        for layer in layers[:options.freeze_layers]:
            layer.requires_grad_(False)
    return model


register(Method(name="full", options=FullOptions, prepare=prepare, artifact="model",
                summary="Every weight trains (optionally the first N layers frozen); saves a whole model."))
