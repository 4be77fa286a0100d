"""Packing: several examples per row give exactly the per-example losses of one example per row; the chunked
cross-entropy gives the loss and gradients of the plain one."""

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tailor.config import TrainConfig
from tailor.errors import TailorError
from tailor.models.base import load_tokenizer
from tailor.train import loop
from tailor.train.examples import IGNORE, collate, tokenize_chat
from tailor.train.packing import pack, pack_rows
from tests.unit.helpers import FACTS, chat

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    # answers of different lengths, so rows hold different numbers of examples
    return [tokenize_chat(tokenizer, chat(q, " ".join([a] * (1 + i % 4)))["messages"])
            for i, (q, a) in enumerate(FACTS * 3)]


def token_losses(model, batch):
    """Cross-entropy of every next-token prediction, [rows, width-1] (0 where there is no label)."""
    hidden = model.get_decoder()(**loop.model_inputs(batch), use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1]).float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return losses * (labels != IGNORE)


def per_example_from_rows(losses, batch, lengths_per_row):
    """Split each row's token losses back into its examples (in row order)."""
    out = []
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for n in lengths:
            # the loss predicting token t sits at t-1: an example's predictions are [start, start+n-1)
            out.append(float(losses[row, start:start + n - 1].sum()))
            start += n
    return out


def test_pack_rows_fills_rows_without_exceeding_capacity():
    lengths = [700, 300, 200, 900, 100, 1500, 50]
    rows = pack_rows(lengths, 1000)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [5] in rows  # longer than a row: alone
    assert all(sum(lengths[i] for i in row) <= 1000 for row in rows if row != [5])
    assert len(rows) == 4  # 1500 | 900+100 | 700+300 | 200+50


def test_packed_rows_give_each_example_its_own_loss(model, tokenizer, examples):
    batch = pack(examples, 160, tokenizer.pad_token_id, CPU)
    rows = pack_rows([len(e.input_ids) for e in examples], 160)
    assert batch["input_ids"].shape[0] == len(rows) < len(examples)  # several examples share rows
    assert batch["attention_mask"] is None
    with torch.no_grad():
        packed = per_example_from_rows(token_losses(model, batch), batch,
                                       [[len(examples[i].input_ids) for i in row] for row in rows])
        alone = [float(token_losses(model, collate([examples[i]], tokenizer.pad_token_id, CPU)).sum())
                 for row in rows for i in row]
        torch.testing.assert_close(torch.tensor(packed), torch.tensor(alone), atol=1e-4, rtol=1e-5)
        # without restarting positions the examples would see each other: the losses would differ
        leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
        crossed = per_example_from_rows(token_losses(model, leaky), leaky,
                                        [[len(examples[i].input_ids) for i in row] for row in rows])
        assert not torch.allclose(torch.tensor(crossed), torch.tensor(alone), atol=1e-2)
        # the training loss: the same sum and label count as padded rows
        packed_sum, packed_count = loop.loss_sum(model, batch)
        padded_sum, padded_count = loop.loss_sum(model, collate(examples, tokenizer.pad_token_id, CPU))
    assert packed_count == padded_count == sum(e.n_label_tokens for e in examples)
    torch.testing.assert_close(packed_sum, padded_sum, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])  # a plain projection, and the recompute path for other heads
def test_chunked_cross_entropy_matches_the_full_logits(monkeypatch, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000, bias=bias)
    hidden = torch.randn(50, 32, requires_grad=True)
    targets = torch.randint(0, 1000, (50,))
    monkeypatch.setattr(loop, "CHUNK_LOGITS", 1000 * 8)  # 8 tokens per chunk: 7 chunks, the last one short
    chunked = loop.chunked_cross_entropy(hidden, head, targets)
    (chunked * 0.5).backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    full = F.cross_entropy(head(hidden), targets, reduction="sum")
    (full * 0.5).backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], head.weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(loop.chunked_cross_entropy(hidden, head, targets), full.detach())


def test_chunked_cross_entropy_keeps_a_frozen_head_frozen(monkeypatch):
    head = torch.nn.Linear(16, 300, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(20, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 300, (20,))
    monkeypatch.setattr(loop, "CHUNK_LOGITS", 300 * 6)
    loop.chunked_cross_entropy(hidden, head, targets).backward()
    assert head.weight.grad is None and hidden.grad.dtype == torch.bfloat16
    reference = hidden.detach().clone().requires_grad_(True)
    F.cross_entropy(head(reference).float(), targets, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, reference.grad, atol=2e-2, rtol=2e-2)


def test_packing_is_refused_for_virtual_token_methods(tiny_model_dir):
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(TailorError, match="train.packing: methods with virtual tokens"):
        loop.use_packing(model, TrainConfig(packing=True))
    assert not loop.use_packing(model, TrainConfig())  # the default leaves them unpacked
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert loop.use_packing(plain, TrainConfig()) and not loop.use_packing(plain, TrainConfig(packing=False))
    assert not loop.use_packing(plain, TrainConfig(), custom_loss=True)  # a method's own loss may need the mask
