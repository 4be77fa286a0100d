"""prefix_tuning starts from zero keys and values: before training the model answers like its base, where PEFT's
random prefix (init: random) starts from a different model."""

import torch

from tailor.methods.prefix_tuning import PrefixTuningOptions, prepare
from tailor.models.base import load_model, load_tokenizer
from tailor.train.examples import tokenize_chat
from tailor.train.loop import evaluate_loss
from tests.unit.helpers import FACTS, chat


def test_zero_prefix_starts_close_to_the_base_and_random_does_not(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = [tokenize_chat(tokenizer, chat(*fact)["messages"], last_turn_only=True) for fact in FACTS]

    def loss(model):
        return evaluate_loss(model, examples, batch_size=3, pad_id=tokenizer.pad_token_id)

    base = loss(load_model(tiny_model_dir, dtype=torch.float32))
    torch.manual_seed(0)
    zero = prepare(load_model(tiny_model_dir, dtype=torch.float32), PrefixTuningOptions(num_virtual_tokens=4))
    torch.manual_seed(0)
    random = prepare(load_model(tiny_model_dir, dtype=torch.float32),
                     PrefixTuningOptions(num_virtual_tokens=4, init="random"))
    assert all(p.abs().sum() == 0 for p in zero.parameters() if p.requires_grad)
    # a tiny random model predicts near-uniformly, so the gap is small here (7.5 against 2.0 on SmolLM2-135M)
    zero_gap, random_gap = abs(loss(zero) - base), abs(loss(random) - base)
    assert zero_gap < 0.01 and random_gap > 5 * zero_gap
