"""What the rollout methods' tests (ppo, grpo) share: rule-based rewards a workspace module provides, prompts
answered yes or no, and how far a policy moved towards "Yes."."""

import torch

REWARDS = """
def says_yes(prompt, answer):
    return 1.0 if "yes" in answer.lower() else 0.0

def broken(prompt, answer):
    raise ValueError("no score today")

def not_a_number(prompt, answer):
    return "high"
"""
PROMPTS = [[{"role": "user", "content": f"Is topic {i} open?"}] for i in range(8)]


def yes_margin(model_dir, run_dir=None) -> float:
    """Mean log P("Yes.") − log P("No.") over the PROMPTS, under the base (or RUN/adapter on it): how far a policy
    moved towards the rule, measured without the noise of a few sampled answers."""
    import peft
    from transformers import AutoModelForCausalLM

    from tailor.models.base import load_tokenizer
    from tailor.train.examples import collate, tokenize_chat
    from tailor.train.loop import sequence_log_probs

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if run_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    model.eval()
    rows = [tokenize_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
            for answer in ("Yes.", "No.") for prompt in PROMPTS]
    with torch.no_grad():
        values = sequence_log_probs(model, collate(rows, tokenizer.pad_token_id, torch.device("cpu")))
    return float(values[:len(PROMPTS)].mean() - values[len(PROMPTS):].mean())
