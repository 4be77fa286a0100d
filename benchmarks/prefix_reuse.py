"""How much prefill a prefix cache could skip on the grounded chatbot's load: an upper bound, no model run.

    python benchmarks/prefix_reuse.py [--count 98] [--results FILE] → benchmarks/results/prefix_reuse.json

The prompts are those of `benchmarks/serve.py --workload rag` (the city questions with their top-5 retrieved
passages quoted as `rag` serves them, ~1,000 tokens each, the default model's chat template). Every prompt is
compared with every earlier one, token by token, as an unbounded radix-tree prefix cache (vLLM's automatic prefix
caching, SGLang's RadixAttention) would reuse them: a prompt skips its longest shared head, less its last token.
No eviction and any block size, so no real cache skips more. Three layouts:
- `as_served`: the prompts as tailor builds them (passages by retrieval score);
- `passages_sorted`: the same passages in one canonical order (by text), the reordering RAGCache-style systems
  use to make shared heads longer; the answer may change, since the model reads the passages in another order;
- `passage_reuse`: every distinct passage's tokens computed once wherever it appears (position-independent
  passage caches such as CacheBlend); this approximates attention across passages, so greedy answers change.
`ratio` is prompt tokens over tokens computed (the issue's `prefill_tokens_saved_ratio`: 2 means half skipped).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_benchmark  # noqa: E402  (its rag_prompts builds the load)

from tailor.models.base import load_tokenizer, resolve_base_model  # noqa: E402
from tailor.workspace import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prefix_reuse.json"
PASSAGE = re.compile(r'^\[\d+\] ', flags=re.M)


def shared_head(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefix_cache(sequences: list[list[int]]) -> dict:
    """Tokens an unbounded prefix cache skips: each prompt's longest head shared with any earlier prompt."""
    total = skipped = 0
    for i, sequence in enumerate(sequences):
        best = max((shared_head(sequence, earlier) for earlier in sequences[:i]), default=0)
        total += len(sequence)
        skipped += min(best, len(sequence) - 1)  # the last prompt token is always computed
    return {"prompt_tokens": total, "skipped": skipped, "ratio": round(total / (total - skipped), 3)}


def sorted_passages(messages: list[dict]) -> list[dict]:
    """The conversation with its quoted passages in one canonical order, renumbered."""
    user = messages[-1]["content"]
    head, _, rest = user.partition("Passages:\n")
    passages = [block for block in PASSAGE.split(rest) if block]
    last = passages[-1]
    end = last.rfind('"""\n') + 4  # the question follows the last passage
    passages[-1], tail = last[:end], last[end:]
    text = head + "Passages:\n" + "".join(f"[{i + 1}] {body}" for i, body in enumerate(sorted(passages))) + tail
    return [*messages[:-1], {"role": "user", "content": text}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=98, help="City questions (the eval set has 98).")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Where the JSON goes.")
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_base_model("smollm2-135m-instruct"))

    def ids(messages: list[dict]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    with tempfile.TemporaryDirectory() as folder:
        prompts, mean_tokens = serve_benchmark.rag_prompts(Path(folder), args.count)
    sequences = [ids(m) for m in prompts]
    as_served = prefix_cache(sequences)
    # the head every prompt shares (system prompt, template, "Passages:"): 76 tokens at the last run
    template_head = min(shared_head(sequences[0], other) for other in sequences[1:])
    reordered = prefix_cache([ids(sorted_passages(m)) for m in prompts])
    passage_tokens = distinct_tokens = 0
    seen: set[str] = set()
    for messages in prompts:
        for passage in re.findall(r'"""\n(.*?)\n"""', messages[-1]["content"], flags=re.S):
            count = len(tokenizer(passage, add_special_tokens=False)["input_ids"])
            passage_tokens += count
            if passage not in seen:
                seen.add(passage)
                distinct_tokens += count
    total = as_served["prompt_tokens"]
    # the shared template head reused as a prefix, every distinct passage computed once, the rest (questions,
    # passage headers) always
    computed = total - template_head * (len(prompts) - 1) - (passage_tokens - distinct_tokens)
    results = {
        "prompts": len(prompts), "prompt_tokens_mean": mean_tokens, "shared_template_tokens": template_head,
        "as_served": as_served, "passages_sorted": reordered,
        "passage_reuse": {"passage_tokens": passage_tokens, "distinct_passage_tokens": distinct_tokens,
                          "distinct_passages": len(seen), "ratio": round(total / computed, 3),
                          "note": "an upper bound that also changes answers (attention across passages "
                                  "approximated); not exact prefix caching"},
        "goal": {"prefill_tokens_saved_ratio": ">= 2 with prefix caching on the shared template",
                 "met_by_exact_prefix_caching": reordered["ratio"] >= 2 or as_served["ratio"] >= 2}}
    write_json(args.results, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
