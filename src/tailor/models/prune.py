"""Compression by pruning the run's merged model, measured before and after on the run's eval set.

- `magnitude`: unstructured; the smallest-magnitude weights of every decoder Linear (attention and MLP projections;
  embeddings, norms and the output head are kept) are set to zero, globally across layers, until the target
  sparsity is reached (torch.nn.utils.prune, made permanent). The tensors keep their shape: the file only shrinks
  once stored sparse or compressed; the report counts the non-zero parameters.
- `structured`: whole attention heads and MLP neurons are removed, so the matrices and the saved model really are
  smaller. Each is scored by the norms of the weights that read and write it (a head: its q rows × its o_proj
  columns; a neuron: gate row × up row × down column) and the lowest are dropped, the same number in every layer
  (transformers' configs hold one head count and one MLP width for all layers). With grouped-query attention the
  same number of query heads is dropped from every key/value group, so the key/value heads stay as they are.

No library prunes Llama heads and neurons structurally in place (torch's `prune.ln_structured` only zeroes rows), so
the slicing is written here.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tailor.errors import TailorError

PRUNE_METHODS = ("magnitude", "structured")
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_linears(model) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in DECODER_LINEARS]


def linear_sparsity(model) -> float:
    """Share of exact zeros among the decoder Linear weights."""
    weights = [module.weight for _, module in decoder_linears(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def magnitude_prune(model, sparsity: float) -> float:
    """Zero the `sparsity` share of decoder Linear weights with the smallest |w|, globally; returns the sparsity
    reached."""
    from torch.nn.utils import prune

    if not 0 < sparsity < 1:
        raise TailorError(f"--sparsity: {sparsity} must be between 0 and 1 (e.g. 0.5 zeroes half the weights)")
    targets = [(module, "weight") for _, module in decoder_linears(model)]
    if not targets:
        raise TailorError("prune: the model has no attention or MLP projections to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        prune.remove(module, name)  # bake the mask into the weight: a plain Linear again, saved as usual
    return linear_sparsity(model)


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A new Linear with only the given output rows."""
    new = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None, dtype=linear.weight.dtype)
    new.weight.data = linear.weight.data[rows].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[rows].clone()
    return new


def _keep_columns(linear: nn.Linear, columns: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(columns), linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
    new.weight.data = linear.weight.data[:, columns].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new


def _layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or getattr(model.config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        raise TailorError(f"prune --method structured: only Llama-style decoders are pruned structurally (this one "
                          f"is '{getattr(model.config, 'model_type', '?')}'); use --method magnitude")
    return layers


@torch.no_grad()
def prune_heads(model, fraction: float) -> int:
    """Drop `fraction` of the query heads of every layer (the same number per key/value group); returns the heads
    left per layer."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_group = heads // kv_heads
    drop = math.floor(per_group * fraction)
    if drop == 0:
        if fraction > 0:  # asked for, but below one head per group: say so rather than prune nothing silently
            raise TailorError(f"--heads: {fraction} removes no head; each of the {kv_heads} key/value groups has "
                              f"{per_group} query heads, so the share goes in steps of 1/{per_group} "
                              f"(--heads {math.ceil(100 / per_group) / 100} removes one per group)")
        return heads
    if drop >= per_group:
        raise TailorError(f"--heads: {fraction} would remove every query head of a key/value group")
    keep_per_group = per_group - drop
    for layer in _layers(model):
        attention = layer.self_attn
        q = attention.q_proj.weight.view(heads, head_dim, -1)  # [heads, head_dim, hidden]
        o = attention.o_proj.weight.view(-1, heads, head_dim)  # [hidden, heads, head_dim]
        score = q.flatten(1).norm(dim=1) * o.transpose(0, 1).flatten(1).norm(dim=1)  # [heads]
        kept = []
        for group in range(kv_heads):  # query heads group·per_group … share key/value head `group`
            members = torch.arange(group * per_group, (group + 1) * per_group)
            best = members[score[members].argsort(descending=True)[:keep_per_group]].sort().values
            kept.append(best)
        kept_heads = torch.cat(kept)
        rows = (kept_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        attention.q_proj = _keep_rows(attention.q_proj, rows)
        attention.o_proj = _keep_columns(attention.o_proj, rows)
        attention.num_key_value_groups = keep_per_group
        if hasattr(attention, "num_heads"):
            attention.num_heads = keep_per_group * kv_heads
    config.head_dim = head_dim  # no longer hidden_size / heads
    config.num_attention_heads = keep_per_group * kv_heads
    return config.num_attention_heads


@torch.no_grad()
def prune_neurons(model, fraction: float) -> int:
    """Drop `fraction` of the MLP's intermediate neurons in every layer; returns the width left."""
    width = model.config.intermediate_size
    keep = width - math.floor(width * fraction)
    if keep == width:
        return width
    if keep < 1:
        raise TailorError(f"--neurons: {fraction} would remove every MLP neuron")
    for layer in _layers(model):
        mlp = layer.mlp
        score = (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
                 * mlp.down_proj.weight.norm(dim=0))  # [width]
        rows = score.argsort(descending=True)[:keep].sort().values
        mlp.gate_proj = _keep_rows(mlp.gate_proj, rows)
        mlp.up_proj = _keep_rows(mlp.up_proj, rows)
        mlp.down_proj = _keep_columns(mlp.down_proj, rows)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    model.config.intermediate_size = keep
    return keep


# ---- measuring ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(model, tokenizer, records: list[dict], limit: int = 64) -> float:
    """Mean cross-entropy on the answer tokens of the eval records (the same loss mask as training)."""
    from tailor.train.examples import IGNORE, tokenize_chat

    total, count = 0.0, 0
    for record in records[:limit]:
        example = tokenize_chat(tokenizer, record["messages"])
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor([example.labels])
        logits = model(input_ids=ids).logits[0, :-1].float()  # [tokens - 1, vocab]; position t predicts t + 1
        targets = labels[0, 1:]
        mask = targets != IGNORE
        total += float(nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum"))
        count += int(mask.sum())
    return total / max(count, 1)


@torch.no_grad()
def decode_latency_ms(model, tokenizer, new_tokens: int = 16, repeats: int = 3) -> float:
    """Median milliseconds per generated token, greedy, on one short prompt (after a warm-up run)."""
    ids = tokenizer("When is the public library open?", return_tensors="pt").input_ids
    timings = []
    for run in range(repeats + 1):
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if run:
            timings.append((time.perf_counter() - start) * 1000 / new_tokens)
    return sorted(timings)[len(timings) // 2]


@dataclass
class Measurement:
    eval_loss: float | None
    parameters: int
    nonzero_parameters: int
    size_bytes: int  # the weights as stored densely (what the safetensors file holds)
    ms_per_token: float


def measure(model, tokenizer, records: list[dict]) -> Measurement:
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return Measurement(eval_loss(model, tokenizer, records) if records else None, params, nonzero, size,
                       decode_latency_ms(model, tokenizer))


@dataclass
class PruneReport:
    method: str
    settings: dict
    before: Measurement
    after: Measurement
    sparsity: float  # share of zero decoder Linear weights after pruning
    shapes: dict = field(default_factory=dict)  # heads / intermediate size before → after
    folder: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def prune_run(run_dir: Path | str, method: str, *, sparsity: float = 0.5, heads: float = 0.0, neurons: float = 0.0,
              out: Path | str | None = None) -> PruneReport:
    """Prune the run's merged model, measure it before and after on RUN/data/eval.jsonl, and save the pruned model
    (a plain transformers folder) with report.json into `out` (default RUN/export/pruned-METHOD)."""
    from tailor.models.base import load_tokenizer
    from tailor.models.export import EXPORT_INFO, check_mergeable, merged_model, read_trained_run
    from tailor.workspace import atomic_dir, now_iso, read_jsonl, write_json

    if method not in PRUNE_METHODS:
        raise TailorError(f"--method: unknown pruning method '{method}' (methods: {', '.join(PRUNE_METHODS)})")
    if method == "structured":
        for option, value in (("--heads", heads), ("--neurons", neurons)):
            if not 0 <= value < 1:
                raise TailorError(f"{option}: {value} must be at least 0 and below 1")
        if heads == 0 and neurons == 0:
            raise TailorError("prune --method structured: give --heads and/or --neurons (shares to remove)")
    elif not 0 < sparsity < 1:
        raise TailorError(f"--sparsity: {sparsity} must be between 0 and 1 (e.g. 0.5 zeroes half the weights)")
    run = read_trained_run(run_dir)
    target = Path(out) if out is not None else Path(run.run_dir) / "export" / f"pruned-{method}"
    if target.exists() and not (target / EXPORT_INFO).is_file():
        raise TailorError(f"--out {target}: exists and is not a tailor export; choose another folder")
    check_mergeable(run)
    eval_path = Path(run.run_dir) / "data" / "eval.jsonl"
    records = [record for _, record in read_jsonl(eval_path)] if eval_path.is_file() else []

    tokenizer = load_tokenizer(run.base_ref)
    model = merged_model(run)
    before = measure(model, tokenizer, records)
    shapes = {"heads": [model.config.num_attention_heads], "intermediate_size": [model.config.intermediate_size]}
    if method == "magnitude":
        reached = magnitude_prune(model, sparsity)
        settings = {"sparsity": sparsity}
    else:
        prune_heads(model, heads)
        prune_neurons(model, neurons)
        reached = linear_sparsity(model)
        settings = {"heads": heads, "neurons": neurons}
    shapes["heads"].append(model.config.num_attention_heads)
    shapes["intermediate_size"].append(model.config.intermediate_size)
    after = measure(model, tokenizer, records)
    report = PruneReport(method, settings, before, after, reached, shapes, str(target))
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "report.json", report.to_dict() | {"eval_set": str(eval_path) if records else None})
        write_json(tmp / EXPORT_INFO, {"format": f"pruned-{method}", "run": str(Path(run.run_dir).resolve()),
                                       "method": run.method.name, "base_model": run.base_ref, "created_at": now_iso(),
                                       "load": "transformers.AutoModelForCausalLM.from_pretrained(folder)"})
    return report
