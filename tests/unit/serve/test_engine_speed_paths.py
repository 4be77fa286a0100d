"""The engine's faster paths on the tiny model: weight-only int8 / int4 linear layers (`serve.quantize`).

What must hold: a quantized layer computes with the weight its codes stand for, on both of its paths (the int
kernel for decoding steps, the dequantized product for prompts); each row's result does not depend on the rows
beside it, so a quantized engine's batched greedy replies equal its one-at-a-time replies with every kind of
customization mixed in a batch; and the quantized model stays close to the unquantized one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tailor.errors import TailorError
from tailor.serve.engine import Engine, default_speculative_tokens
from tailor.serve.quantize import INT4_GROUP, KERNEL_POSITIONS, QuantizedLinear, quantize_linears
from tests.unit.serve.test_engine import QUESTIONS, customizations  # noqa: F401 - the adapters fixture, shared


def _layer(bits: int, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Linear, QuantizedLinear]:
    torch.manual_seed(seed)
    linear = nn.Linear(96, 160, bias=True).to(dtype)
    return linear, QuantizedLinear(linear, bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_layer_computes_with_the_weight_its_codes_stand_for(bits, dtype):
    linear, layer = _layer(bits, dtype)
    weight = linear.weight.detach().float()
    dequantized = layer.dequantized(torch.float32)
    # rounding to the nearest code: at most half a step off, per row (int8) or per group of 32 inputs (int4)
    if bits == 8:
        step = weight.abs().amax(1, keepdim=True) / 127
    else:
        groups = weight.view(weight.shape[0], -1, INT4_GROUP)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(INT4_GROUP, 1)
    # bf16 layers keep their scales in bf16: a further error of 8 bits' rounding of the row's largest weight
    rounding = weight.abs().amax(1, keepdim=True) * 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    assert ((dequantized - weight).abs() <= step / 2 * 1.01 + rounding).all()
    assert (dequantized - weight).abs().max() > 0  # it did quantize
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for positions in (1, KERNEL_POSITIONS, KERNEL_POSITIONS + 1, 40):  # the kernel path, then the prompt path
        x = torch.randn(3, positions, 96, dtype=dtype)
        expected = nn.functional.linear(x.float(), dequantized, linear.bias.float())
        assert torch.allclose(layer(x).float(), expected, atol=tolerance, rtol=tolerance), positions


@pytest.mark.parametrize("bits", [8, 4])
def test_each_row_of_a_decoding_step_is_computed_alone(bits):
    """What lets batched greedy decoding equal one-at-a-time decoding: a row's output is the same bits whatever rows
    share its step (one position per row), and whatever draft positions follow it (speculation)."""
    _, layer = _layer(bits, torch.bfloat16, seed=1)
    x = torch.randn(16, 1, 96, dtype=torch.bfloat16)
    together = layer(x)
    for row in range(16):
        assert torch.equal(layer(x[row:row + 1]), together[row:row + 1])
    drafts = torch.randn(1, 5, 96, dtype=torch.bfloat16)
    assert torch.equal(layer(drafts)[:, :1], layer(drafts[:, :1]))


def test_unknown_quantizations_and_unfit_shapes_are_refused():
    with pytest.raises(TailorError, match="serve.quantize: must be one of none, int8, int4"):
        quantize_linears(nn.Sequential(nn.Linear(64, 64)), "int3")
    with pytest.raises(TailorError, match="int4 needs layers whose inputs are a multiple of 32.*use int8"):
        quantize_linears(nn.Sequential(nn.Linear(48, 64)), "int4")
    model = quantize_linears(nn.Sequential(nn.Linear(48, 64)), "int8")
    assert isinstance(model[0], QuantizedLinear) and model[0].weight is None


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_quantized_model_stays_close_to_the_unquantized_one(tiny_model_dir, quantize):
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    quantized = quantize_linears(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
                                 quantize)
    assert sum(isinstance(m, QuantizedLinear) for m in quantized.modules()) == 2 * 7 + 1  # lm_head too
    ids = torch.randint(0, full.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = full(ids).logits, quantized(ids).logits  # [2, 24, vocab]
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < (0.02 if quantize == "int8" else 0.15), relative
    assert relative > 0


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized_engine(request, tiny_model_dir, customizations):  # noqa: F811
    engine = Engine(tiny_model_dir, adapters=customizations, dtype=torch.float32, max_new_tokens=12,
                    max_batch_size=8, max_queue=8, speculative_tokens=4, quantize=request.param)
    yield engine
    engine.shutdown()


def test_a_quantized_engine_decodes_in_a_batch_as_one_at_a_time(quantized_engine):
    """Every kind of customization (base, two LoRA adapters on the quantized layers, soft prompt, prefix) in one
    batch; each reply equals the same request sent alone (which also speculates: 5 positions in one step)."""
    engine = quantized_engine
    base = engine.customizations.backbones["base"]
    assert sum(isinstance(m, QuantizedLinear) for m in base.modules()) == 2 * 7 + 1
    names = ["base", "city", "parks", "soft", "prefix", "soft", "city"]
    with engine.scheduler.condition:  # nothing is admitted until every request is queued: one mixed batch
        replies = [engine.stream(name, [{"role": "user", "content": q}], temperature=0, max_tokens=10)
                   for name, q in zip(names, QUESTIONS, strict=True)]
    batched = [reply.text() for reply in replies]
    assert engine.stats()["peak_batch_size"] == len(names)
    before = engine.stats()["speculation"]["steps"]
    alone = [engine.stream(name, [{"role": "user", "content": q}], temperature=0, max_tokens=10).text()
             for name, q in zip(names, QUESTIONS, strict=True)]
    assert engine.stats()["speculation"]["steps"] > before
    assert batched == alone
    # the LoRA adapters wrap the quantized layers and change the answer to the same question
    wrapped = [m for m in base.modules() if isinstance(getattr(m, "base_layer", None), QuantizedLinear)]
    assert len(wrapped) >= 2 * 2
    same_question = {name: engine.stream(name, [{"role": "user", "content": QUESTIONS[0]}], temperature=0,
                                         max_tokens=10).text() for name in ("base", "city", "parks")}
    assert len(set(same_question.values())) == 3, same_question


def test_an_unknown_quantization_is_refused_when_the_engine_starts(tiny_model_dir):
    with pytest.raises(TailorError, match="serve.quantize: must be one of"):
        Engine(tiny_model_dir, dtype=torch.float32, quantize="fp8")


def test_speculation_defaults_follow_the_cost_of_an_extra_position(tiny_model_dir):
    """Null serve.speculative_tokens: 4 draft tokens for bf16 weights, 1 for int8/int4 (their kernels' cost grows with
    positions), none for float32 on a CPU."""
    assert default_speculative_tokens(torch.bfloat16, "none") == 4
    assert default_speculative_tokens(torch.bfloat16, "int4") == default_speculative_tokens(torch.bfloat16, "int8") == 1
    assert default_speculative_tokens(torch.float32, "int4") == 0
    engine = Engine(tiny_model_dir, dtype=torch.bfloat16, max_new_tokens=4, quantize="int4")
    try:
        assert engine.speculative_tokens == 1
    finally:
        engine.shutdown()
