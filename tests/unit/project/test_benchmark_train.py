"""benchmarks/train.py's own measurements, without training: the bf16 peak behind its MFU, and where it writes."""

from pathlib import Path

import torch

from tests.unit.helpers import load_benchmark

REPO = Path(__file__).resolve().parents[3]


def train_benchmark():
    return load_benchmark("train")


def test_bf16_peak_is_the_best_shape_median_on_this_process_threads():
    peak = train_benchmark().bf16_peak(64, 128, windows=3, window_s=0.01, warmup_s=0.01)
    assert peak["threads"] == torch.get_num_threads() and peak["windows"] == 3
    medians = {name: shape["tflops_median"] for name, shape in peak["per_shape"].items()}
    assert set(medians) == {"square_2048", "mlp_up", "mlp_down"}
    assert peak["per_shape"]["mlp_up"]["shape"] == [4096, 64, 128]  # the model's own MLP shapes
    assert peak["shape"] == max(medians, key=medians.get) and peak["bf16_flops"] == medians[peak["shape"]] * 1e12
    assert all(shape["tflops_min"] <= shape["tflops_median"] <= shape["tflops_max"]
               for shape in peak["per_shape"].values())


def test_results_go_where_out_says_as_in_the_other_benchmarks(tmp_path):
    parser = train_benchmark().arguments()
    assert parser.parse_args([]).out == REPO / "benchmarks" / "results" / "train.json"
    assert parser.parse_args(["--out", str(tmp_path / "t.json")]).out == tmp_path / "t.json"
