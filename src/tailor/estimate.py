"""Before training: how many tokens, FLOPs, how much memory, how long and what it costs, on this machine and on
rented GPUs, and how well such estimates matched the runs already in the registry.

The arithmetic, with every assumption returned next to the numbers so the report can show it:
- training FLOPs ≈ 6·N per token (forward 2N, backward 4N) when every weight trains; 4·N when the base is frozen
  (backward still propagates through the base, 2N, but computes no weight gradients for it), plus 6·P for the P
  trainable parameters (Kaplan et al. 2020; Hoffmann et al. 2022, appendix F).
- memory = weights + gradients + AdamW states (two fp32 moments) + activations. Activations per layer follow
  Korthikanti et al. 2022 (no recomputation, 16-bit): s·b·h·(34 + 5·a·s/h) bytes, plus the fp32 logits.
- time = FLOPs / (peak FLOP/s × utilization). This machine's peak is a measured bf16 (or fp32) matmul probe; GPUs
  use published dense bf16 peaks. Utilization is assumed, or calibrated from past runs in the registry.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tailor.errors import TailorError

GIB = 1024**3
ASSUMED_CPU_UTILIZATION = 0.35  # share of the matmul probe a training step reaches on CPU (no calibration yet)
ASSUMED_GPU_UTILIZATION = 0.40  # model FLOPs utilization typical of single-GPU fine-tuning of small models


@dataclass
class Hardware:
    name: str
    peak_tflops: float  # dense 16-bit (the CPU: measured)
    memory_gib: float
    dollars_per_hour: float
    utilization: float
    source: str  # where the numbers come from


# published dense bf16 tensor-core peaks (no sparsity) and typical on-demand prices; both are assumptions
GPU_PROFILES = (
    Hardware("A10G 24GB", 125.0, 24, 1.01, ASSUMED_GPU_UTILIZATION, "NVIDIA A10G datasheet; AWS g5.xlarge on demand"),
    Hardware("A100 40GB", 312.0, 40, 3.00, ASSUMED_GPU_UTILIZATION, "NVIDIA A100 datasheet; typical cloud price"),
    Hardware("A100 80GB", 312.0, 80, 3.70, ASSUMED_GPU_UTILIZATION, "NVIDIA A100 datasheet; typical cloud price"),
    Hardware("H100 80GB", 989.0, 80, 6.90, ASSUMED_GPU_UTILIZATION, "NVIDIA H100 SXM datasheet; typical cloud price"),
)


def probe_matmul_tflops(dtype: torch.dtype = torch.bfloat16, size: int = 1024, seconds: float = 0.5) -> float:
    """Measured matrix-multiply throughput of this machine in TFLOP/s (2·size³ FLOPs per product)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm-up: first call pays for thread-pool start and kernel selection
    products, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or products < 3:
        torch.matmul(a, b)
        products += 1
    return 2 * size**3 * products / elapsed / 1e12


def machine_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return float("nan")


@dataclass
class ModelShape:
    params: int  # N
    layers: int
    hidden: int
    heads: int
    vocab: int


def model_shape(model_ref: str) -> ModelShape:
    """Parameter count and dimensions from the config alone: the model is built on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_ref)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    return ModelShape(params, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                      config.vocab_size)


def trainable_params(config, model_ref: str, method_name: str) -> int:
    """The method's trainable parameters, counted on a meta-device model prepared exactly as training prepares it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tailor.methods import registry

    method = registry.get(method_name, key="train.method")
    if not method.trains or method.prepare is None:
        return 0
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_ref))
        prepared = method.prepare(model, config.method_options(method.name))
    return sum(p.numel() for p in prepared.parameters() if p.requires_grad)


def lora_params(config, model_ref: str) -> int:
    """LoRA's A and B matrices (r·(in + out) per targeted Linear), with the configured rank and targets."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = config.method_options("lora")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_ref))
    return sum(options.r * (module.in_features + module.out_features) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in options.targets)


@dataclass
class DataStats:
    records: int
    tokens: int  # one epoch
    max_tokens: int
    mean_tokens: float


def dataset_stats(path: Path, tokenizer) -> DataStats:
    from tailor.train.examples import chat_ids
    from tailor.workspace import read_jsonl

    if not Path(path).is_file():
        raise TailorError(f"{path}: no training data; run `tailor data build` first (or pass --data FILE)")
    lengths = []
    for line_no, record in read_jsonl(path):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TailorError(f"{path}:{line_no}: expected a non-empty \"messages\" list")
        lengths.append(len(chat_ids(tokenizer, messages)))
    if not lengths:
        raise TailorError(f"{path}: no records")
    return DataStats(len(lengths), sum(lengths), max(lengths), sum(lengths) / len(lengths))


@dataclass
class MemoryEstimate:
    method: str
    trainable: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    assumption: str

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.gradients_gib + self.optimizer_gib + self.activations_gib


def activation_bytes(shape: ModelShape, batch: int, seq: int) -> float:
    """Korthikanti et al. 2022, eq. 2 (16-bit, no recomputation), all layers, plus fp32 logits and their gradient."""
    s, b, h, a = seq, batch, shape.hidden, shape.heads
    per_layer = s * b * h * (34 + 5 * a * s / h)
    return shape.layers * per_layer + 2 * 4 * b * s * shape.vocab


def memory_estimates(shape: ModelShape, lora: int, batch: int, seq: int) -> list[MemoryEstimate]:
    n, act = shape.params, activation_bytes(shape, batch, seq) / GIB
    return [
        MemoryEstimate("full", n, 4 * n / GIB, 4 * n / GIB, 8 * n / GIB, act,
                       "fp32 master weights and gradients, AdamW's two fp32 moments: 16 bytes per parameter"),
        MemoryEstimate("lora", lora, (2 * n + 4 * lora) / GIB, 4 * lora / GIB, 8 * lora / GIB, act,
                       "frozen base in bf16 (2 bytes/param); adapters fp32 with gradients and AdamW: 16 bytes each"),
        MemoryEstimate("qlora", lora, (0.5625 * n + 4 * lora) / GIB, 4 * lora / GIB, 8 * lora / GIB, act,
                       "base in 4-bit NF4 with a 16-bit scale per 64 weights (4.5 bits/param); adapters as LoRA"),
    ]


@dataclass
class HardwareEstimate:
    hardware: str
    peak_tflops: float
    utilization: float
    hours: float
    dollars: float
    fits_memory: bool | None  # the configured method's memory on this hardware
    source: str


@dataclass
class PastRun:
    label: str
    method: str
    tokens: int
    measured_seconds: float
    estimated_seconds: float

    @property
    def ratio(self) -> float:
        return self.estimated_seconds / self.measured_seconds if self.measured_seconds else float("nan")


@dataclass
class Estimate:
    method: str
    base_model: str
    params: int
    trainable: int
    frozen_base: bool
    data: DataStats
    epochs: float
    steps: int
    tokens: int  # processed over the whole run
    flops: float
    flops_rule: str
    memory: list[MemoryEstimate]
    hardware: list[HardwareEstimate]
    past_runs: list[PastRun] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        for row, memory in zip(data["memory"], self.memory, strict=True):
            row["total_gib"] = memory.total_gib
        for row, past in zip(data["past_runs"], self.past_runs, strict=True):
            row["ratio"] = past.ratio
        return data


def training_flops(params: int, trainable: int, tokens: int, frozen_base: bool) -> float:
    if not frozen_base:
        return 6.0 * params * tokens
    return 4.0 * params * tokens + 6.0 * trainable * tokens


def _run_length(config, data: DataStats) -> tuple[int, float, int]:
    """(optimizer steps, epochs, tokens processed) as the training loop will run them."""
    per_step = config.train.batch_size * config.train.grad_accum
    steps_per_epoch = max(1, math.ceil(data.records / per_step))
    if config.train.max_steps > 0:
        steps = config.train.max_steps
        epochs = steps / steps_per_epoch
    else:
        epochs = float(config.train.epochs)
        steps = int(steps_per_epoch * epochs)
    return steps, epochs, int(data.tokens * epochs)


def past_runs(registry, base_model: str, shape: ModelShape, cpu_peak: float, utilization: float) -> list[PastRun]:
    """Registered runs of the same base model that recorded their tokens and seconds, each re-estimated with the
    same rule on this machine's profile."""
    found = []
    for version in registry.versions():
        train = version.metrics.get("train", {})
        tokens, seconds = train.get("tokens"), train.get("seconds")
        if version.base_model != base_model or not tokens or not seconds:
            continue
        trainable = int(train.get("trainable_params") or 0)
        frozen = version.method != "full"
        flops = training_flops(shape.params, trainable, int(tokens), frozen)
        found.append(PastRun(version.label, version.method, int(tokens), float(seconds),
                             flops / (cpu_peak * 1e12 * utilization)))
    return found


def grounded_stats(config, root: Path, data_path: Path, base_ref: str, tokenizer, method) -> DataStats:
    """A method that trains on retrieved passages (raft) reads each pair with its passages in the prompt, several
    times the pair's own tokens (measured: 111 → ~600 on Privoxy's pairs): count the records it will build."""
    from tailor.methods.registry import TrainContext
    from tailor.models.base import pick_dtype

    run_dir = Path(data_path).parent.parent  # RUN/data/train.jsonl: the method reads its run's data and index
    context = TrainContext(config, Path(root), run_dir, base_ref, pick_dtype(config.train.dtype),
                           config.method_options(method.name))
    lengths = [len(example.input_ids) for phase in method.phases(context, tokenizer)
               for example in phase.train_examples]
    if not lengths:
        raise TailorError(f"{data_path}: no records")
    return DataStats(len(lengths), sum(lengths), max(lengths), sum(lengths) / len(lengths))


def estimate(config, root: Path, data_path: Path, *, method: str | None = None, registry=None,
             probe_seconds: float = 0.5) -> Estimate:
    from tailor.methods import registry as methods
    from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model

    method = method or config.train.method
    base_ref = resolve_base_model(config.base_model, root=root)
    tokenizer = load_tokenizer(base_ref)
    spec = methods.get(method, key="train.method")
    if spec.grounded and spec.trains and spec.phases is not None:
        data = grounded_stats(config, root, data_path, base_ref, tokenizer, spec)
    else:
        data = dataset_stats(data_path, tokenizer)
    shape = model_shape(base_ref)
    trainable = trainable_params(config, base_ref, method)
    frozen_base = method != "full"
    steps, epochs, tokens = _run_length(config, data)
    flops = training_flops(shape.params, trainable, tokens, frozen_base) if trainable else 0.0
    lora = lora_params(config, base_ref)
    memory = memory_estimates(shape, lora, config.train.batch_size, data.max_tokens)

    dtype = pick_dtype(config.train.dtype)
    cpu_peak = probe_matmul_tflops(dtype, seconds=probe_seconds)
    dtype_name = str(dtype).removeprefix("torch.")
    assumptions = [
        f"{'4·N' if frozen_base else '6·N'} FLOPs per token (N = {shape.params:,} base parameters)"
        + (f" + 6·P for the {trainable:,} trainable ones" if frozen_base else ""),
        f"a step reads batch_size × grad_accum = {config.train.batch_size * config.train.grad_accum} records; "
        f"activations sized for the longest record ({data.max_tokens} tokens) in a batch of "
        f"{config.train.batch_size}",
        f"this machine: {dtype_name} {1024}×{1024} matmul probe = {cpu_peak * 1000:.1f} GFLOP/s peak",
        f"GPU utilization {ASSUMED_GPU_UTILIZATION:.0%} of the dense bf16 peak; prices are on-demand list prices",
    ]
    past: list[PastRun] = []
    utilization = ASSUMED_CPU_UTILIZATION
    if registry is not None:
        past = past_runs(registry, base_ref, shape, cpu_peak, ASSUMED_CPU_UTILIZATION)
        if past:  # calibrate: the utilization that would have predicted the past runs exactly (median)
            ratios = sorted(run.ratio for run in past)
            utilization = ASSUMED_CPU_UTILIZATION * ratios[len(ratios) // 2]
            assumptions.append(f"this machine's utilization {utilization:.0%}, calibrated on {len(past)} past "
                               f"run(s) in the registry (assumed {ASSUMED_CPU_UTILIZATION:.0%} before)")
    if not past:
        assumptions.append(f"this machine's utilization {utilization:.0%} (assumed; no past runs to calibrate on)")
    qlora = method == "lora" and config.method_options("lora").quantize_4bit
    needed = {m.method: m.total_gib for m in memory}.get("qlora" if qlora else method)
    this_machine = Hardware("this machine (CPU)", cpu_peak, machine_memory_gib(), 0.0, utilization,
                            f"measured {dtype_name} matmul probe; your own hardware, no hourly price")
    profiles = [this_machine, *GPU_PROFILES]
    hardware = []
    for profile in profiles:
        seconds = flops / (profile.peak_tflops * 1e12 * profile.utilization) if flops else 0.0
        hardware.append(HardwareEstimate(profile.name, profile.peak_tflops, profile.utilization, seconds / 3600,
                                         seconds / 3600 * profile.dollars_per_hour,
                                         None if needed is None else needed <= profile.memory_gib, profile.source))
    return Estimate(method, base_ref, shape.params, trainable, frozen_base, data, epochs, steps, tokens, flops,
                    assumptions[0], memory, hardware, past, assumptions)
