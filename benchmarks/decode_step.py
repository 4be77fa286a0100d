"""One decoding step of the serving engine's model, without HTTP or scheduling: where the time of a step goes.

    python benchmarks/decode_step.py [--quick] [--results FILE] → benchmarks/results/decode_step.json

The default model as `tailor serve` loads it (bf16, serve.quantize int4 unless --quantize), 2 torch threads, a
cache of `columns` positions per row (about 150: a chat question; 1,100: a grounded prompt with five passages),
`rows` rows decoding together. Variants, all in one run:
- `sdpa_dynamic_cache`: transformers' defaults, the engine before attention.py and GrowingCache: SDPA's CPU kernel
  and a DynamicLayer that concatenates;
- `tailor`: the engine now: attention.py's decoding attention on a cache that grows in place (batching.py);
- `tailor_compiled_mlp` (not with --quick): the same, with each layer's MLP and norms under `torch.compile`
  (dynamic shapes), to see whether compiling the small ops pays. Compiling the whole model breaks its graph at
  every cache update.
Greedy tokens of the variants are compared (`same_tokens`): the decoding attention computes softmax in fp32 where
SDPA's bf16 kernel does not, so bf16 runs may differ in a late token; the tests check equality where the
precision is the same.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from tailor.models.base import load_model, resolve_base_model
from tailor.serve.attention import use_cpu_decode_attention
from tailor.serve.batching import GrowingCache
from tailor.serve.quantize import quantize_linears
from tailor.workspace import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "decode_step.json"
SHAPES = [(1, 150), (1, 1100), (8, 150), (8, 1100)]  # (rows, cached columns)


def model_for(variant: str, quantize: str):
    model = quantize_linears(load_model(resolve_base_model("smollm2-135m-instruct"), dtype=torch.bfloat16).eval(),
                             quantize)
    if variant == "sdpa_dynamic_cache":
        return model, DynamicCache
    model = use_cpu_decode_attention(model)
    if variant == "tailor_compiled_mlp":
        for layer in model.model.layers:
            for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
                setattr(layer, name, torch.compile(getattr(layer, name), dynamic=True))
    return model, GrowingCache


def time_steps(model, cache_class, rows: int, columns: int, steps: int, repeats: int) -> tuple[float, list[int]]:
    """Median ms per decoding step over `repeats` runs of `steps` steps, and row 0's greedy tokens."""
    generator = torch.Generator().manual_seed(columns)
    prompt = torch.randint(100, 20000, (rows, columns), generator=generator)
    timings, tokens = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = cache_class()
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # [rows, 1]
            tokens = [int(token[0])]
            position = columns
            started = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, position_ids=torch.full((rows, 1), position), past_key_values=cache,
                            use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token[0]))
                position += 1
            timings.append((time.perf_counter() - started) / steps * 1000)
    return statistics.median(timings), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer steps, no compiled variant (a minute).")
    parser.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["sdpa_dynamic_cache", "tailor"] + ([] if args.quick else ["tailor_compiled_mlp"])
    steps, repeats = (16, 1) if args.quick else (48, 3)
    results: dict = {"model": "smollm2-135m-instruct", "dtype": "bf16", "quantize": args.quantize,
                     "torch_threads": args.threads, "steps": steps, "repeats": repeats, "quick": args.quick,
                     "variants": variants, "ms_per_step": {}, "same_tokens": {}}
    measured: dict[str, dict[str, tuple[float, list[int]]]] = {}
    for variant in variants:
        model, cache_class = model_for(variant, args.quantize)
        if variant == "tailor_compiled_mlp":  # compile for prompts and steps outside the timings
            time_steps(model, cache_class, 1, 150, 2, 1)
            time_steps(model, cache_class, 8, 150, 2, 1)
        for rows, columns in SHAPES:
            shape = f"{rows}x{columns}"
            measured.setdefault(shape, {})[variant] = time_steps(model, cache_class, rows, columns, steps, repeats)
            print(f"{variant:22} rows {rows} columns {columns}: {measured[shape][variant][0]:.2f} ms/step",
                  flush=True)
    for shape, by_variant in measured.items():
        results["ms_per_step"][shape] = {variant: round(ms, 2) for variant, (ms, _) in by_variant.items()}
        results["same_tokens"][shape] = {variant: tokens == by_variant["sdpa_dynamic_cache"][1]
                                         for variant, (_, tokens) in by_variant.items()}
    results["speedup_over_sdpa_dynamic_cache"] = {
        shape: round(by_variant["sdpa_dynamic_cache"][0] / by_variant["tailor"][0], 2)
        for shape, by_variant in measured.items()}
    results["note"] = ("rows x cached columns; ms per decoding step (median of repeats), one forward pass of one "
                       "token per row; the prompt's prefill is not timed")
    write_json(args.results, results)
    print(results["speedup_over_sdpa_dynamic_cache"])


if __name__ == "__main__":
    main()
