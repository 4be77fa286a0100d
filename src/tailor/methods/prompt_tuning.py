"""Prompt tuning: a few trainable "virtual token" embeddings prepended to every input; the model is untouched
(Lester et al., 2021). One small tensor per task, so one base model serves many tasks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tailor.methods.registry import Method, MethodOptions, register, require_context_room


class PromptTuningOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, gt=0, description="Trainable embeddings prepended to every input.")
    init: Literal["text", "random"] = Field(
        "text", description="Start from the embeddings of `init_text` (trains faster and steadier) or at random.")
    init_text: str = Field("Answer the question in one short, factual sentence.", min_length=1, description=(
        "Text whose token embeddings initialize the virtual tokens, repeated or cut to num_virtual_tokens."))


def prepare(model, options: PromptTuningOptions):
    """Wrap the base model so that only the virtual-token embeddings train."""
    import peft  # imported here: it costs seconds, and loading a config must stay fast
    require_context_room(model, options.num_virtual_tokens, "methods.prompt_tuning.num_virtual_tokens")
    if options.init == "text":
        config = peft.PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens, task_type="CAUSAL_LM",
                                         prompt_tuning_init="TEXT", prompt_tuning_init_text=options.init_text,
                                         tokenizer_name_or_path=model.name_or_path)
    else:
        config = peft.PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens, task_type="CAUSAL_LM",
                                         prompt_tuning_init="RANDOM")
    return peft.get_peft_model(model, config)


register(Method(name="prompt_tuning", options=PromptTuningOptions, prepare=prepare, artifact="adapter",
                summary="Trainable virtual-token embeddings before the input (soft prompt); model untouched."))
