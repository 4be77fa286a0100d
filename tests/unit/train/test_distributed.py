"""Data-parallel training: `accelerate launch` runs the unchanged `tailor train` on two CPU processes (gloo), and the
run ends with the losses and weights of one process that trains on the same global batches (grad_accum 2 there,
1 per process here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tailor.config import validate_config
from tailor.train.run import run_training
from tailor.workspace import write_jsonl
from tests.unit.helpers import FACTS, chat

# --multi_gpu selects accelerate's torchrun launcher, which starts N processes on any machine; `--cpu` would pick
# its simple launcher, which starts one process unless mpirun is installed. Without CUDA the Accelerator joins
# the gloo group (distributed.py). Port 0: accelerate binds a free port, so parallel test runs never collide.
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", "0"]


def workspace(root: Path, model_dir: str, grad_accum: int) -> Path:
    # 12 distinct records (answers of 1-4 repeats, so rows differ in length), 4 steps of 3 per micro-batch
    records = [chat(q, " ".join([a] * (1 + i % 4))) for i, (q, a) in enumerate(FACTS * 4)]
    write_jsonl(root / "run" / "data" / "train.jsonl", records)
    write_jsonl(root / "run" / "data" / "eval.jsonl", [chat(*fact) for fact in FACTS])
    settings = {"base_model": model_dir, "methods": {"lora": {"r": 4, "alpha": 8}},
                "train": {"method": "lora", "max_steps": 4, "batch_size": 3, "grad_accum": grad_accum,
                          "learning_rate": 5e-3, "warmup_ratio": 0.0, "save_every": 0, "dtype": "fp32"}}
    (root / "tailor.yaml").write_text(yaml.safe_dump(settings))
    return root / "run"


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_accelerate_launch_on_two_processes_trains_like_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    two = workspace(tmp_path / "two", tiny_model_dir, grad_accum=1)
    # CUDA hidden: on a one-GPU machine both processes would otherwise ask for a device each
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([*ACCELERATE_LAUNCH, "-m", "tailor.cli.app", "train", "-w", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    # both processes ran the command (each prints its summary), not one process alone
    assert done.stdout.count("trained lora: 4 steps") == 2, done.stdout[-2000:]

    one = workspace(tmp_path / "one", tiny_model_dir, grad_accum=2)
    run_training(validate_config(yaml.safe_load((tmp_path / "one" / "tailor.yaml").read_text())), tmp_path / "one",
                 one, show_progress=False)

    # only the main process wrote files: one log with one line per step
    assert len(losses(two)) == 4
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), atol=1e-4, rtol=0)
    parallel = load_file(two / "adapter" / "adapter_model.safetensors")
    single = load_file(one / "adapter" / "adapter_model.safetensors")
    assert parallel.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(parallel[name], value, atol=1e-5, rtol=1e-4)
    # the run actually trained (LoRA B starts at zero)
    assert any(value.abs().sum() > 0 for name, value in single.items() if "lora_B" in name)
