"""Write a Llama-architecture transformers model as a GGUF file that llama.cpp loads (f16 or q8_0), and run the golden
prompts through llama.cpp to check it.

llama.cpp's own converter (convert_hf_to_gguf.py) is not on PyPI, so the conversion is written here with the `gguf`
package (the same writer, tensor-name map and Q8_0 quantizer the converter uses), for the one architecture tailor
trains: Llama (SmolLM2 and the test models). What the converter does for Llama and we must do too:
- q and k projections are permuted: transformers splits each head's rotary dimensions into two halves, llama.cpp
  interleaves them (pairs), so rows are reordered per head (`permute_rotary` below);
- 1-D tensors (norms) stay f32, matrices become f16 or Q8_0 (blocks of 32 along the row; a row whose length is not a
  multiple of 32 stays f16);
- tied embeddings: no `output.weight`; llama.cpp reuses `token_embd.weight`;
- the tokenizer travels inside the file: byte-level BPE ("gpt2") tokens with their types, merges, special token ids,
  the pre-tokenizer's name and the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tailor.errors import TailorError

GGUF_TYPES = ("f16", "q8_0")
GGUF_FILE = "model.gguf"


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """[heads·head_dim, in] in transformers' rotate-half order → llama.cpp's interleaved order, per head."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization regex; an unknown one is refused, not guessed, because
    llama.cpp would then split text differently from the tokenizer the model was trained with."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex, as SmolLM2 converted from its GGUF uses
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM/SmolLM2 as published on the hub: digits split one by one
    raise TailorError(f"--format gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no "
                      "known llama.cpp equivalent; only byte-level BPE tokenizers of the GPT-2/SmolLM kind are "
                      "converted")


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id, as convert_hf_to_gguf.py derives them for gpt2 BPE."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id → AddedToken
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, gguf_type: str = "f16",
               name: str = "tailor export") -> dict[str, int]:
    """Write `model` (a transformers LlamaForCausalLM, adapters already merged) to `path`. `tokenizer_dir` holds the
    saved tokenizer files (tokenizer.json, chat template), read for merges and special tokens.
    Returns how many tensors were written per GGML type."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise TailorError(f"--gguf-type: unknown type '{gguf_type}' (types: {', '.join(GGUF_TYPES)})")
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise TailorError(f"--format gguf: only Llama-architecture models are converted (this one is "
                          f"'{getattr(config, 'model_type', '?')}'); export --format merged instead")
    tokenizer_json = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        raise TailorError("--format gguf: only byte-level BPE tokenizers are converted")
    pre = pre_tokenizer_name(tokenizer_json)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TailorError(f"--format gguf: rope scaling '{rope.get('rope_type')}' is not converted")
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(tokenizer_dir), load_merges=True, n_vocab=config.vocab_size)
    if not special.merges:
        raise TailorError(f"{tokenizer_dir}/tokenizer.json: no BPE merges found; the tokenizer cannot be converted")
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and tokenizer.chat_template:  # saved as chat_template.jinja by transformers 5
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, layers)
    counts: dict[str, int] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TailorError(f"--format gguf: no llama.cpp name for the tensor '{hf_name}'")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, kv_heads)
        if data.ndim == 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
        else:
            qtype = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(gguf_name, packed, raw_shape=None if qtype == gguf.GGMLQuantizationType.Q8_0
                          else data.shape, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return counts


# ---- llama.cpp side (llama-cpp-python) ---------------------------------------------------------------------------


def open_llama(path: Path, *, n_ctx: int = 512):
    """llama.cpp on the file, keeping the logits of every position (`Llama.scores`): greedy decoding and the logit
    comparison both read them (without logits_all, llama-cpp-python stores none)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise TailorError("--verify for gguf needs llama-cpp-python (`make setup` builds it; or CMAKE_ARGS="
                          "\"-DGGML_NATIVE=ON -DLLAMA_CURL=OFF\" pip install llama-cpp-python)") from None
    import os

    # llama.cpp's threads spin at a barrier after every operation: with more threads than idle cores (a shared CI
    # runner, a laptop busy with the reference model) a step gets ~30x slower, so use half the cores, at most 4
    threads = max(1, min(4, len(os.sched_getaffinity(0)) // 2))
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0, n_threads=threads,
                     n_threads_batch=threads)
    except (ValueError, RuntimeError) as exc:
        raise TailorError(f"{path}: llama.cpp cannot load the file ({exc})") from None


@dataclass
class LlamaAnswer:
    tokens: list[int]
    logits: np.ndarray | None  # [positions, vocab] over prompt + reference answer, when asked for


def llama_greedy(llm, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding on llama.cpp's raw logits (argmax per step), so no sampler setting can differ from
    transformers' greedy search."""
    llm.reset()
    llm.eval(prompt_ids)
    answer: list[int] = []
    while len(answer) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        answer.append(token)
        if token in stop_ids:
            break
        llm.eval([token])
    return answer


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` ([positions, vocab])."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


# ---- transformers' GGUF reader: the check that needs no compiler --------------------------------------------------


class TransformersGGUF:
    """The GGUF file read back by transformers' own GGUF loader (gguf tensors dequantized, q/k un-permuted, the
    tokenizer rebuilt from the file's metadata), with the calls `verify_gguf` makes of llama.cpp. An independent
    reader of the format for machines without llama-cpp-python, which compiles llama.cpp from source for over 20
    minutes on 2 cores; it checks names, permutation, hyperparameters and tokenizer, not llama.cpp's kernels."""

    reader = "transformers"

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            raise TailorError(f"{path}: transformers cannot read the GGUF file ({exc})") from None

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        answer: list[int] = []
        with torch.no_grad():
            ids = torch.tensor([prompt_ids])
            past = None
            while len(answer) < max_new_tokens:
                out = self.model(input_ids=ids, cache=past, use_cache=True)
                token = int(out.logits[0, -1].argmax())
                answer.append(token)
                if token in stop_ids:
                    break
                past, ids = out.cache, torch.tensor([[token]])
        return answer

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # [positions, vocab]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


class LlamaCppGGUF:
    """llama.cpp itself on the file (llama-cpp-python), behind the same three calls."""

    reader = "llama.cpp"

    def __init__(self, path: Path):
        self.llm = open_llama(path)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        return llama_greedy(self.llm, prompt_ids, max_new_tokens, stop_ids)

    def logits(self, ids: list[int]) -> np.ndarray:
        return llama_logits(self.llm, ids)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def _llama_cpp_cffi_path() -> Path | None:
    """Where llama-cpp-cffi's CPU extension is, without importing its package."""
    import importlib.util

    spec = importlib.util.find_spec("llama")
    folders = spec.submodule_search_locations or [] if spec else []
    return next((path for folder in folders for path in Path(folder).glob("_llama_cpp_cpu*.so")), None)


def _llama_cpp_cffi():
    """llama.cpp's C API from llama-cpp-cffi's prebuilt CPU module. Its wheels carry llama.cpp compiled (glibc 2.27+),
    so CI runs llama.cpp's own loader, tokenizer and kernels without compiling it (llama-cpp-python builds from
    source: over 20 minutes on 2 cores). The extension is loaded by file because the package's `__init__` imports
    its hub, CUDA and Vulkan helpers, whose pins (transformers < 5) tailor cannot install; the module itself needs
    none of them."""
    import importlib.util

    found = _llama_cpp_cffi_path()
    if found is None:
        raise TailorError("--verify for gguf in llama.cpp needs llama-cpp-cffi (`make setup` installs it) or "
                          "llama-cpp-python")
    module_spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", found)
    if module_spec is None or module_spec.loader is None:
        raise TailorError(f"{found}: llama-cpp-cffi's llama.cpp module cannot be loaded")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.lib, module.ffi


class LlamaCppCffiGGUF:
    """llama.cpp on the file through its C API (llama-cpp-cffi), behind the same three calls: decode with logits
    at every position (`llama_get_logits_ith`), greedy steps on those raw logits, and llama.cpp's tokenizer."""

    reader = "llama.cpp"

    def __init__(self, path: Path, *, n_ctx: int = 512, threads: int | None = None):
        import os

        self.lib, self.ffi = lib, ffi = _llama_cpp_cffi()
        # default half the cores (see open_llama: spinning threads against other work); a server alone on the
        # machine may take them all
        threads = threads or max(1, min(4, len(os.sched_getaffinity(0)) // 2))
        with _quiet_stderr():  # llama.cpp logs every tensor it loads
            lib.llama_backend_init()
            model_params = lib.llama_model_default_params()
            model_params.n_gpu_layers = 0
            self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
            if self.model == ffi.NULL:
                raise TailorError(f"{path}: llama.cpp cannot load the file")
            params = lib.llama_context_default_params()
            params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ctx, n_ctx
            params.n_threads, params.n_threads_batch = threads, threads
            self.ctx = lib.llama_init_from_model(self.model, params)
        if self.ctx == ffi.NULL:
            lib.llama_model_free(self.model)
            raise TailorError(f"{path}: llama.cpp cannot create a context for the file")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab, self.n_ctx = lib.llama_vocab_n_tokens(self.vocab), n_ctx

    def __del__(self):
        if getattr(self, "ctx", None) is not None:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Feed `ids` at positions start…; the logits of every fed position (all_logits) or of the last one."""
        lib, ffi = self.lib, self.ffi
        if start + len(ids) > self.n_ctx:
            raise TailorError(f"llama.cpp: {start + len(ids)} tokens exceed the context of {self.n_ctx}")
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
            if lib.llama_decode(self.ctx, batch) != 0:
                raise TailorError("llama.cpp: llama_decode failed")
        finally:
            lib.llama_batch_free(batch)
        rows = range(len(ids)) if all_logits else [len(ids) - 1]
        return np.stack([np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(self.ctx, i), 4 * self.n_vocab),
                                       dtype=np.float32).copy() for i in rows])

    def start(self, prompt_ids: list[int]) -> np.ndarray:
        """A new sequence: the prompt's last-position logits [vocab]; `step` then feeds one token at a time."""
        self.lib.llama_kv_cache_clear(self.ctx)
        self.position = len(prompt_ids)
        return self._decode(prompt_ids, 0, all_logits=False)[-1]

    def step(self, token: int) -> np.ndarray:
        self.position += 1
        return self._decode([token], self.position - 1, all_logits=False)[-1]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy decoding on llama.cpp's raw logits (argmax per step), like `llama_greedy`."""
        row = self.start(prompt_ids)
        answer: list[int] = []
        while len(answer) < max_new_tokens:
            token = int(np.argmax(row))
            answer.append(token)
            if token in stop_ids:
                break
            row = self.step(token)
        return answer

    def logits(self, ids: list[int]) -> np.ndarray:
        self.lib.llama_kv_cache_clear(self.ctx)
        return self._decode(ids, 0, all_logits=True)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        tokens = self.ffi.new(f"llama_token[{room}]")
        # add_special False (the templated prompt carries its own), parse_special True (<|im_start|> is one token)
        count = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, room, False, True)
        if count < 0:
            raise TailorError("llama.cpp: tokenizing the prompt failed")
        return [tokens[i] for i in range(count)]


class _quiet_stderr:
    """Silence file descriptor 2 (C code writing directly to it) for the duration of a block."""

    def __enter__(self):
        import os
        import sys

        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        import os

        os.dup2(self.saved, 2)
        os.close(self.saved)


def open_gguf_reader(path: Path):
    """llama.cpp when a binding is installed — llama-cpp-python (`make llama-cpp`) or llama-cpp-cffi (`make setup`:
    prebuilt) — else transformers' GGUF reader."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp"):
        return LlamaCppGGUF(path)
    if _llama_cpp_cffi_path() is not None:
        return LlamaCppCffiGGUF(path)
    return TransformersGGUF(path)
