"""Export a trained run to forms other runtimes load, and check that the export answers like the run.

- `merged`: the adapter folded into the base weights (`merge_and_unload`), saved as a plain Hugging Face folder
  (safetensors + tokenizer + chat template): `AutoModelForCausalLM.from_pretrained(folder)` loads it, no peft needed.
- `int8`: the merged model with every `nn.Linear` dynamically quantized to int8 (weights int8, activations quantized
  on the fly), for CPU serving. PyTorch has no `from_pretrained` for it: the folder holds `config.json`, the
  tokenizer and `model.int8.pt` (the quantized state dict); `load_int8(folder)` rebuilds the model from the config,
  quantizes the same modules and loads the state dict.

- `gguf` / `gguf-q8_0`: the merged model as one GGUF file for llama.cpp (f16 or Q8_0 weights, tokenizer and chat
  template inside; see models/gguf.py). `--verify` runs the golden prompts through llama.cpp itself
  (llama-cpp-python, or llama-cpp-cffi's prebuilt build), else through transformers' GGUF reader.
- `prompt`: what prompt-learning methods and prompt profiles leave: the PEFT adapter (virtual tokens), the run's
  prompt table and its prompt profile, copied with a README saying what each file is and how it loads.

Methods that only prepend learned virtual tokens (prompt_tuning, p_tuning, prefix_tuning) change no weight, so there
is nothing to merge: they are refused with a clear message that points to `--format prompt`. A run's prompt table
and prompt profile travel with every export (copied next to the weights, described in PROMPTS.md). Every export is
written to a temporary folder beside the target, verified there when asked, and renamed into place, so a failed
export or verification leaves nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tailor.config import TailorConfig, validate_config
from tailor.errors import TailorError
from tailor.methods.artifacts import artifact_dir, run_method
from tailor.methods.kinds import ADAPTER, PROMPT, PROMPT_TABLE, ArtifactKind, get_kind
from tailor.methods.registry import Method
from tailor.models.base import load_tokenizer, resolve_base_model
from tailor.workspace import MANIFEST, atomic_dir, file_sha256, now_iso, read_json, write_json

FORMATS = ("merged", "int8", "gguf", "gguf-q8_0", "prompt")
GGUF_FORMATS = {"gguf": "f16", "gguf-q8_0": "q8_0"}  # format → GGUF weight type
EXPORT_INFO = "export.json"
PROMPTS_README = "PROMPTS.md"
LOADERS = {
    "merged": "transformers.AutoModelForCausalLM.from_pretrained(folder)",
    "int8": "tailor.models.export.load_int8(folder)",
    "gguf": "llama_cpp.Llama(model_path=folder/model.gguf) or llama.cpp's llama-cli -m folder/model.gguf",
    "gguf-q8_0": "llama_cpp.Llama(model_path=folder/model.gguf) or llama.cpp's llama-cli -m folder/model.gguf",
    "prompt": "see PROMPTS.md: peft.PeftModel.from_pretrained(base, folder/adapter); the prompt table with "
              "safetensors; the profile with tailor.methods.prompt.load_profile(folder/prompt)",
}
INT8_WEIGHTS = "model.int8.pt"
MERGED_TOLERANCE = 1e-3  # fp32 merge: only summation order differs, so logits agree to ~1e-5
GOLDEN_PROMPTS = (
    "When is the public library open?",
    "How do I renew a parking permit?",
    "Where can I pay a water bill?",
    "What should I do about a pothole on my street?",
    "How do I register a new business?",
)


@dataclass
class TrainedRun:
    """What export needs to know about a run folder, read from its manifest.json."""

    run_dir: Path
    method: Method
    config: TailorConfig
    base_ref: str

    @property
    def artifact(self) -> Path:
        return artifact_dir(self.run_dir, self.method)

    @property
    def kind(self) -> ArtifactKind:
        return get_kind(self.method.artifact)


def read_trained_run(run_dir: Path | str, *, weights: bool = True) -> TrainedRun:
    """The run's method, config and base model; with `weights`, the run must hold trained weights to export."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    trained = manifest.get("stages", {}).get("train")
    if not trained or "config" not in manifest:
        raise TailorError(f"{run_dir}: no finished training recorded in {MANIFEST}; run `tailor train` first")
    config = validate_config(manifest["config"], source=str(manifest_path))
    method = run_method(config, run_dir)
    base_ref = resolve_base_model(trained.get("base_model") or config.base_model, root=run_dir.parent)
    run = TrainedRun(run_dir, method, config, base_ref)
    if not weights:
        return run
    if not method.trains:
        what = ("serve it with the base model and its index (`tailor serve`)" if method.artifact == "rag" else
                "export its profile with --format prompt, or serve it with the base model (`tailor serve`)")
        raise TailorError(f"{method.name}: changes no weights, so there is no model to export; {what}")
    if not run.kind.holds(run.artifact):
        raise TailorError(f"{run.artifact}: no trained {method.name} artifact ({run.kind.marker} missing)")
    return run


def check_mergeable(run: TrainedRun) -> None:
    """Refuse, before any weight is read, artifacts without weights to merge, and adapters that add virtual tokens
    instead of changing weights."""
    if run.kind.load_weights is None:
        raise TailorError(f"{run.method.name}: its artifact is {run.kind.summary}, which holds no weights to merge")
    if run.kind is not ADAPTER:
        return
    import peft

    try:
        adapter_config = peft.PeftConfig.from_pretrained(str(run.artifact))
    except (ValueError, OSError, TypeError) as exc:
        raise TailorError(f"{run.artifact}/{ADAPTER.marker}: unreadable, the artifact is corrupted "
                          f"({str(exc).splitlines()[0]}); nothing was written") from None
    if adapter_config.is_prompt_learning:
        raise TailorError(f"{run.method.name}: cannot be merged (its virtual tokens are inputs, not weights); export "
                          f"the adapter with its prompt table instead: `tailor export {run.run_dir} --format prompt`")


def load_reference(run: TrainedRun):
    """The run's model as training left it: adapter on base (or the full model), fp32, on the CPU, eval mode.
    A damaged artifact file (truncated, bit-flipped header, wrong shapes) is reported as such, not as a traceback."""
    from safetensors import SafetensorError

    if run.kind.load_weights is None:
        raise TailorError(f"{run.method.name}: its artifact is {run.kind.summary}, which holds no weights")
    try:
        return run.kind.load_weights(run.artifact, run.base_ref, torch.float32).cpu().eval()
    except (SafetensorError, RuntimeError, ValueError, OSError) as exc:
        raise TailorError(f"{run.artifact}: the artifact is corrupted and cannot be loaded "
                          f"({str(exc).splitlines()[0][:200]}); nothing was written") from None


def merged_model(run: TrainedRun):
    """Adapter weights folded into the base weights: a plain transformers model."""
    check_mergeable(run)
    model = load_reference(run)
    return model.merge_and_unload().eval() if run.kind is ADAPTER else model


def quantize_int8(model):
    """Dynamic int8 quantization of every nn.Linear (the lm_head included); embeddings and norms stay fp32."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model.cpu().eval(), {torch.nn.Linear}, dtype=torch.qint8)


def save_merged(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)  # with the chat template, so the folder chats on its own


def save_int8(model, tokenizer, folder: Path) -> None:
    torch.save(model.state_dict(), folder / INT8_WEIGHTS)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_int8(folder: Path | str):
    """Load an int8 export: build the model from config.json, quantize the same modules, load model.int8.pt."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / INT8_WEIGHTS).is_file():
        raise TailorError(f"{folder}: not an int8 export (no {INT8_WEIGHTS})")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model = quantize_int8(model)
    with warnings.catch_warnings():  # packed int8 weights still travel as TypedStorage, which torch warns about
        warnings.simplefilter("ignore", UserWarning)
        model.load_state_dict(torch.load(folder / INT8_WEIGHTS, weights_only=True))
    return model.eval()


def load_export(folder: Path | str, fmt: str):
    from transformers import AutoModelForCausalLM

    if fmt == "int8":
        return load_int8(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@dataclass
class VerifyReport:
    format: str
    prompts: list[str]
    reference_answers: list[str]
    export_answers: list[str]
    matches: list[bool]
    logit_diffs: list[float]  # per prompt: max |reference logit - export logit| over positions and vocabulary
    tolerance: float | None  # None: report only
    problems: list[str] = field(default_factory=list)
    # gguf: whether the GGUF reader's tokenizer turns each templated prompt into the same ids as transformers'
    tokenizer_match: list[bool] = field(default_factory=list)
    reader: str | None = None  # gguf: "llama.cpp", or "transformers" (its GGUF loader) without a llama.cpp binding

    @property
    def exact_match(self) -> float:
        return sum(self.matches) / len(self.matches)

    @property
    def max_logit_diff(self) -> float:
        return max(self.logit_diffs)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return asdict(self) | {"exact_match": self.exact_match, "max_logit_diff": self.max_logit_diff,
                               "passed": self.passed}


@torch.no_grad()
def verify_export(reference, exported, tokenizer, fmt: str, *, system_prompt: str, tolerance: float | None,
                  prompts: tuple[str, ...] = GOLDEN_PROMPTS, max_new_tokens: int = 24) -> VerifyReport:
    """Greedy answers of both models on the golden prompts, and the largest logit difference on prompt + answer.

    Exact match is required whenever a tolerance is (merged exports); int8 with no tolerance is reported only.
    """
    from tailor.train.examples import chat_ids

    report = VerifyReport(fmt, list(prompts), [], [], [], [], tolerance)
    for prompt in prompts:
        ids = chat_ids(tokenizer, [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}],
                       add_generation_prompt=True)
        input_ids = torch.tensor([ids])  # [1, prompt tokens]
        answers = []
        for model in (reference, exported):
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers.append(output[0, len(ids):])
        # both models read the same tokens (prompt + the reference's answer), so logits compare position by position
        sequence = torch.cat([input_ids[0], answers[0]]).unsqueeze(0)  # [1, tokens]
        diff = (reference(input_ids=sequence).logits - exported(input_ids=sequence).logits).abs().max().item()
        report.reference_answers.append(tokenizer.decode(answers[0], skip_special_tokens=True).strip())
        report.export_answers.append(tokenizer.decode(answers[1], skip_special_tokens=True).strip())
        report.matches.append(torch.equal(answers[0], answers[1]))
        report.logit_diffs.append(diff)
    if tolerance is not None:
        if report.max_logit_diff > tolerance:
            report.problems.append(f"largest logit difference {report.max_logit_diff:.3g} exceeds the tolerance "
                                   f"{tolerance:g}")
        if fmt == "merged" and report.exact_match < 1.0:
            report.problems.append(f"greedy answers match on {sum(report.matches)} of {len(prompts)} prompts")
    return report


@dataclass
class ExportResult:
    folder: Path
    format: str
    method: str
    files: dict[str, str]  # file name → sha256
    verify: VerifyReport | None = None


def default_folder(run_dir: Path, fmt: str) -> Path:
    return Path(run_dir) / "export" / fmt


def prompt_artifacts(run: TrainedRun) -> dict[str, Path]:
    """What the run holds besides weights that a deployment needs: the prompt-learning adapter (for --format
    prompt), the p_tuning prompt table with its index, and the prompt profile. Name in the export → source."""
    found: dict[str, Path] = {path.name: path for path in PROMPT_TABLE.files(run.run_dir)}
    if PROMPT.holds(PROMPT.in_run(run.run_dir)):
        found[PROMPT.folder] = PROMPT.in_run(run.run_dir)
    return found


def _describe_prompts(run: TrainedRun, copied: dict[str, Path], adapter: bool) -> str:
    """PROMPTS.md: what each copied prompt file is and how to use it."""
    lines = [f"# Prompt artifacts of {run.run_dir.name}", "",
             f"Exported by `tailor export` from `{run.run_dir.resolve()}` (method `{run.method.name}`, base model "
             f"`{run.base_ref}`). These are not weights: they are inputs the base model is given.", ""]
    if adapter:
        lines += ["- `adapter/`: the PEFT prompt-learning adapter (learned virtual-token embeddings). Load it on the "
                  "base model: `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "
                  "\"adapter\")`. It cannot be merged into the weights: the tokens are prepended to every input."]
    if PROMPT_TABLE.marker in copied:
        lines += ["- `prompt_table.safetensors` + `prompt_table.json`: p-tuning's prompt table, one tensor "
                  "[num_virtual_tokens, hidden] per task name (the index gives each task's base model and date). "
                  "Prepend a task's rows to the input embeddings (`inputs_embeds`) to run that task; "
                  "`safetensors.torch.load_file` reads it."]
    if "prompt" in copied:
        lines += ["- `prompt/`: a prompt profile (`profile.json`: system prompt, k, chain-of-thought flag, embedding "
                  "model, the training question/answer pairs; `embeddings.safetensors`: the questions' normalized "
                  "embeddings). `tailor.methods.prompt.load_profile(folder)` loads it and `apply_profile` inserts the "
                  "k nearest examples as earlier turns of a conversation."]
    return "\n".join(lines) + "\n"


def _copy_prompts(run: TrainedRun, folder: Path, *, adapter: bool = False) -> dict[str, Path]:
    copied = prompt_artifacts(run)
    if adapter:
        shutil.copytree(run.artifact, folder / "adapter")
    for name, source in copied.items():
        if source.is_dir():
            shutil.copytree(source, folder / name)
        else:
            shutil.copy2(source, folder / name)
    if copied or adapter:
        (folder / PROMPTS_README).write_text(_describe_prompts(run, copied, adapter), encoding="utf-8")
    return copied


def export_run(run_dir: Path | str, fmt: str, out: Path | str | None = None, *, verify: bool = False,
               tolerance: float | None = MERGED_TOLERANCE, expected_checksums: dict[str, str] | None = None
               ) -> ExportResult:
    """Export the run's model as `fmt` into `out` (default RUN/export/FORMAT); with `verify`, compare it with the
    adapter on the base before it is moved into place. `tolerance` bounds the logit difference (None: report only).
    `expected_checksums` (registry artifact path → sha256) are checked before anything is read.
    """
    if fmt not in FORMATS:
        raise TailorError(f"--format: unknown format '{fmt}' (formats: {', '.join(FORMATS)})")
    run = read_trained_run(run_dir, weights=fmt != "prompt")
    target = Path(out) if out is not None else default_folder(run.run_dir, fmt)
    if target.exists() and not (target / EXPORT_INFO).is_file():
        raise TailorError(f"--out {target}: exists and is not a tailor export; choose another folder")
    if expected_checksums:
        check_checksums(run.run_dir, expected_checksums)
    if fmt == "prompt":
        return _export_prompts(run, target)
    check_mergeable(run)  # before the base model is read

    tokenizer = load_tokenizer(run.base_ref)
    model = merged_model(run)
    if fmt == "int8":
        model = quantize_int8(model)
    with atomic_dir(target) as tmp:  # a failed verify writes nothing
        gguf_counts = None
        if fmt in GGUF_FORMATS:
            from tailor.models.gguf import GGUF_FILE, write_gguf

            with tempfile.TemporaryDirectory() as tokenizer_dir:  # the converter reads merges from tokenizer.json
                tokenizer.save_pretrained(tokenizer_dir)
                gguf_counts = write_gguf(model, tokenizer, Path(tokenizer_dir), tmp / GGUF_FILE, GGUF_FORMATS[fmt],
                                         name=f"{run.run_dir.name} ({run.method.name})")
        else:
            (save_int8 if fmt == "int8" else save_merged)(model, tokenizer, tmp)
        del model
        report = None
        if verify:  # the saved files are what gets checked, loaded the way a user loads them
            if fmt in GGUF_FORMATS:
                report = verify_gguf(load_reference(run), tmp / GGUF_FILE, tokenizer, fmt,
                                     system_prompt=run.config.system_prompt, tolerance=tolerance)
            else:
                report = verify_export(load_reference(run), load_export(tmp, fmt), tokenizer, fmt,
                                       system_prompt=run.config.system_prompt, tolerance=tolerance)
            if not report.passed:
                raise VerifyFailed(report)
        copied = _copy_prompts(run, tmp)
        files = {path.relative_to(tmp).as_posix(): file_sha256(path) for path in sorted(tmp.rglob("*"))
                 if path.is_file()}
        write_json(tmp / EXPORT_INFO, {
            "format": fmt, "run": str(run.run_dir.resolve()), "method": run.method.name, "base_model": run.base_ref,
            "created_at": now_iso(), "files": files, "verify": report.to_dict() if report else None,
            "prompt_artifacts": sorted(copied), "gguf_tensor_types": gguf_counts, "load": LOADERS[fmt]})
    return ExportResult(target, fmt, run.method.name, files, report)


def _export_prompts(run: TrainedRun, target: Path) -> ExportResult:
    """--format prompt: the prompt-learning adapter, prompt table and profile, with PROMPTS.md."""
    import peft

    adapter = False
    if run.kind is ADAPTER and ADAPTER.holds(run.artifact):
        adapter = peft.PeftConfig.from_pretrained(str(run.artifact)).is_prompt_learning
    if not adapter and not prompt_artifacts(run):
        raise TailorError(f"--format prompt: {run.run_dir} has no prompt-learning adapter, prompt table or prompt "
                          f"profile; export its weights with --format merged, int8 or gguf")
    with atomic_dir(target) as tmp:
        copied = _copy_prompts(run, tmp, adapter=adapter)
        files = {path.relative_to(tmp).as_posix(): file_sha256(path) for path in sorted(tmp.rglob("*"))
                 if path.is_file()}
        write_json(tmp / EXPORT_INFO, {
            "format": "prompt", "run": str(run.run_dir.resolve()), "method": run.method.name,
            "base_model": run.base_ref, "created_at": now_iso(), "files": files, "verify": None,
            "prompt_artifacts": sorted(copied) + (["adapter"] if adapter else []), "load": LOADERS["prompt"]})
    return ExportResult(target, "prompt", run.method.name, files, None)


def check_checksums(run_dir: Path, expected: dict[str, str]) -> None:
    """Every registered artifact file must still have its sha256; a changed or missing one stops the export."""
    for relative, digest in expected.items():
        path = Path(run_dir) / relative
        if not path.is_file():
            raise TailorError(f"{path}: registered artifact file is missing; nothing was written")
        if file_sha256(path) != digest:
            raise TailorError(f"{path}: checksum mismatch with the registry (registered sha256 {digest[:12]}…); the "
                              f"artifact is corrupted or changed after registration; nothing was written")


def verify_gguf(reference, gguf_path: Path, tokenizer, fmt: str, *, system_prompt: str, tolerance: float | None,
                prompts: tuple[str, ...] = GOLDEN_PROMPTS, max_new_tokens: int = 24) -> VerifyReport:
    """The golden prompts decoded greedily by adapter-on-base (transformers, fp32) and by a GGUF reader (llama.cpp, or
    transformers' GGUF loader where llama-cpp-python is not installed) reading the file: exact-match rate, and the
    largest logit difference on prompt + reference answer. Both read the same token ids (the chat template applied by
    transformers); whether llama.cpp's own tokenizer splits the prompt text the same way is recorded in
    `tokenizer_match`."""
    from tailor.models.gguf import open_gguf_reader
    from tailor.train.examples import chat_ids

    llm = open_gguf_reader(gguf_path)
    stop_ids = {tokenizer.eos_token_id}
    report = VerifyReport(fmt, list(prompts), [], [], [], [], tolerance, reader=llm.reader)
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
        ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
        input_ids = torch.tensor([ids])  # [1, prompt tokens]
        with torch.no_grad():
            output = reference.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answer = output[0, len(ids):].tolist()
        llama_answer = llm.greedy(ids, max_new_tokens, stop_ids)
        sequence = ids + answer
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([sequence])).logits[0].float().numpy()  # [tokens, vocab]
        found = llm.logits(sequence)
        report.logit_diffs.append(float(abs(expected - found[:, :expected.shape[1]]).max()))
        report.reference_answers.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
        report.export_answers.append(tokenizer.decode(llama_answer, skip_special_tokens=True).strip())
        report.matches.append(answer == llama_answer)
        text = tokenizer.decode(ids)
        report.tokenizer_match.append(llm.tokenize(text) == ids)
    del llm
    if tolerance is not None and report.max_logit_diff > tolerance:
        report.problems.append(f"largest logit difference {report.max_logit_diff:.3g} exceeds the tolerance "
                               f"{tolerance:g}")
    return report


class VerifyFailed(TailorError):
    """The export answers differently from adapter-on-base; it was not written."""

    def __init__(self, report: VerifyReport):
        self.report = report
        super().__init__(f"verify failed for the {report.format} export: {'; '.join(report.problems)}; "
                         "nothing was written")
