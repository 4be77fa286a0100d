"""Data-parallel training: two CPU processes launched by torchrun (gloo, through accelerate) end with the weights
and losses of one process that trains on the same global batches (grad_accum 2 there, 1 per process here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tailor.config import TrainConfig
from tailor.models.base import load_tokenizer
from tailor.train.examples import tokenize_chat
from tailor.train.loop import train

from records import FACTS, chat  # tests/unit/records.py; pytest puts tests/unit on sys.path

HERE = Path(__file__).resolve()


def lora_model(model_dir: str):
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM"))


def train_once(model_dir: str, out_dir: Path, grad_accum: int) -> dict:
    """Train LoRA for 4 steps; return the trainable weights and the per-step losses (on the main process)."""
    tokenizer = load_tokenizer(model_dir)
    examples = [tokenize_chat(tokenizer, chat(q, a * (1 + i % 4))["messages"]) for i, (q, a) in enumerate(FACTS * 6)]
    cfg = TrainConfig(max_steps=4, batch_size=3, grad_accum=grad_accum, learning_rate=5e-3, warmup_ratio=0.0,
                      save_every=0)
    model = lora_model(model_dir)
    result = train(model, examples, [], cfg, out_dir, pad_id=tokenizer.pad_token_id, show_progress=False)
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "losses": [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            if (out_dir / "metrics.jsonl").exists() else None, "tokens": result.tokens}


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    two = tmp_path / "two"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    done = subprocess.run([*launcher, str(HERE), tiny_model_dir, str(two)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    parallel = torch.load(two / "result.pt")

    single = train_once(tiny_model_dir, tmp_path / "one", grad_accum=2)
    assert parallel["losses"] is not None and len(parallel["losses"]) == 4
    torch.testing.assert_close(torch.tensor(parallel["losses"]), torch.tensor(single["losses"]), atol=1e-4, rtol=0)
    assert parallel["tokens"] == single["tokens"]  # every example counted once, across both processes
    for name, value in single["weights"].items():
        torch.testing.assert_close(parallel["weights"][name], value, atol=1e-5, rtol=1e-4)
    # the run actually trained (LoRA B starts at zero)
    assert any(value.abs().sum() > 0 for name, value in single["weights"].items() if "lora_B" in name)
    # only the main process wrote files: one log with one line per step
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 4


if __name__ == "__main__":  # a worker under torchrun
    from accelerate import PartialState

    model_dir, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    outcome = train_once(model_dir, out, grad_accum=1)
    if PartialState().is_main_process:
        torch.save(outcome, out / "result.pt")
