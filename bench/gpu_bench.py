"""`make bench-gpu`: deltakd on a GPU at Qwen2.5 sizes, with nothing downloaded.

    python bench/gpu_bench.py              (a CUDA device: writes docs/benchmarks-gpu.md)
    python bench/gpu_bench.py --cpu-smoke  (scaled-down shapes on the CPU: the same code path,
                                            written under runs/bench/gpu/; the tests run it)

Randomly initialised models of the Qwen2.5 configurations written below (a 0.5B student, two
1.5B teachers; 151,936 tokens, embeddings tied as in the published models; built as Llama layers
of those sizes, see `llama_of`), a word-level tokenizer of
that size and synthetic rows of realistic lengths (bench/synthetic.py). It runs cache-teachers
(both teachers and the student), distill kd in full and with LoRA (bf16 autocast), and greedy
generation, each for a fixed number of tokens, and reports tokens/s, model FLOP utilisation
(2N FLOP per token forward, 6N training, N the model's parameters, against the device's dense
bf16 peak from PEAK_BF16_TFLOPS) and peak device memory (torch.cuda.max_memory_allocated)."""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synthetic  # noqa: E402
from common import REPO, WORKDIR, machine  # noqa: E402

# The published configurations (config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B).
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)  # fmt: skip
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)  # fmt: skip

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, without sparsity). Matched in order
# against the device's name, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),  # with float32 accumulation, as torch's bf16 matmuls use
)


@dataclass(frozen=True)
class Shape:
    """The sizes of one run of the bench."""

    name: str
    student: dict
    teacher: dict
    rows: int
    prompt_tokens: int
    response_tokens: int
    cache_batch: int
    train_batch: int
    train_steps: int
    prompts: int
    new_tokens: int
    device: str
    dtype: str


GPU = Shape("gpu", QWEN25_05B, QWEN25_15B, rows=256, prompt_tokens=384, response_tokens=127,
            cache_batch=16, train_batch=8, train_steps=24, prompts=32, new_tokens=128,
            device="cuda", dtype="bfloat16")  # fmt: skip
# The same code on the CPU in seconds: Qwen2 layers, a small vocabulary and width.
TINY_STUDENT = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)  # fmt: skip
TINY_TEACHER = dict(TINY_STUDENT, hidden_size=96, intermediate_size=192, num_hidden_layers=3)
CPU_SMOKE = Shape("cpu-smoke", TINY_STUDENT, TINY_TEACHER, rows=8, prompt_tokens=24,
                  response_tokens=7, cache_batch=4, train_batch=4, train_steps=2, prompts=4,
                  new_tokens=4, device="cpu", dtype="float32")  # fmt: skip


def peak_tflops(device_name: str | None) -> float | None:
    """The device's dense bf16 peak, or None for a device the table does not know."""
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if device_name and fragment in device_name:
            return tflops
    return None


def parameters(model_dir: Path) -> int:
    from deltakd_cli import memory
    from deltakd_cli.models import DEFAULT_LOAD

    return memory.shape_of_model(str(model_dir), DEFAULT_LOAD).parameters


# ----------------------------------------------------------------------------- measuring


class DevicePeak:
    """Peak memory of what runs inside it: the CUDA allocator's high-water mark, or on the CPU
    this process's resident high-water mark (reset before, read after)."""

    def __init__(self, device: str):
        self.device = device
        self.mib = 0

    def __enter__(self) -> DevicePeak:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            from deltakd_cli.pipeline.stages import reset_peak_rss

            reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            from deltakd_cli.pipeline.stages import peak_rss_kib

            self.mib = peak_rss_kib() / 1024


def utilisation(flop_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    return None if peak is None else flop_per_token * tokens_per_s / (peak * 1e12)


def run_cache(shape: Shape, models: dict, rows: Path, work: Path, peak: float | None) -> dict:
    from deltakd_cli.cache.build import cache_teachers
    from deltakd_cli.cache.options import CacheOptions

    out = work / "cache"
    shutil.rmtree(out, ignore_errors=True)
    options = CacheOptions(
        teacher_base=str(models["teacher_base"]), teacher_tuned=str(models["teacher_tuned"]),
        student=str(models["student"]), data=str(rows), out=str(out), template="plain",
        max_length=shape.prompt_tokens + shape.response_tokens + 1,
        batch_size=shape.cache_batch, device=shape.device, dtype=shape.dtype,
    )  # fmt: skip
    with DevicePeak(shape.device) as measured:
        manifest = cache_teachers(options)
    tokens_per_s = manifest["counts"]["tokens"] / manifest["timing"]["loop_seconds"]
    n = sum(models["parameters"][role] for role in ("teacher_base", "teacher_tuned", "student"))
    return {
        "tokens": manifest["counts"]["tokens"],
        "tokens_per_s": tokens_per_s,
        "mfu": utilisation(2 * n, tokens_per_s, peak),
        "flop_per_token": f"2N, N = {n:,} (both teachers and the student)",
        "peak_memory_mib": measured.mib,
    }


def run_distill(shape: Shape, models: dict, work: Path, lora: bool, peak: float | None) -> dict:
    from deltakd_cli.train.loop import distill
    from deltakd_cli.train.options import DistillOptions

    out = work / ("distill-lora" if lora else "distill-full")
    shutil.rmtree(out, ignore_errors=True)
    options = DistillOptions(
        cache=str(work / "cache"), student=str(models["student"]), out=str(out),
        objective="kd", max_steps=shape.train_steps, batch_size=shape.train_batch,
        device=shape.device, dtype=shape.dtype, save_every=0, num_workers=0,
        verify_cache=False, lr=1e-4, lora_r=16 if lora else 0,
    )  # fmt: skip
    with DevicePeak(shape.device) as measured:
        distill(options)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = steps[1:] or steps  # the first step warms up (kernels, allocator)
    seconds = statistics.median(s["target_tokens"] / s["tokens_per_s"] for s in timed)
    tokens_per_s = shape.train_batch * (shape.prompt_tokens + shape.response_tokens + 1) / seconds
    n = models["parameters"]["student"]
    return {
        "tokens": shape.train_steps * shape.train_batch
        * (shape.prompt_tokens + shape.response_tokens + 1),
        "tokens_per_s": tokens_per_s,
        "mfu": utilisation(6 * n, tokens_per_s, peak),
        "flop_per_token": f"6N, N = {n:,}" + (" (LoRA: counted as full training)" if lora else ""),
        "peak_memory_mib": measured.mib,
    }  # fmt: skip


def run_generation(shape: Shape, models: dict, rows: Path, peak: float | None) -> dict:
    """Greedy decoding of exactly `new_tokens` per prompt (EOS ignored: a random model's EOS
    would end rows at random), prompts batched and left-padded as deltakd eval does."""
    from deltakd_cli import data
    from deltakd_cli import models as loading
    from deltakd_cli.evaluate.generate import left_pad

    device = torch.device(shape.device)
    dtype = loading.resolve_dtype(shape.dtype, device)
    tokenizer = loading.load_tokenizer(str(models["student"]))
    examples = data.load_examples(rows)[: shape.prompts]
    prompts = [data.encode_prompt(example, "plain", tokenizer) for example in examples]
    with DevicePeak(shape.device) as measured:
        model = loading.load_model(str(models["student"]), dtype, device)
        input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id, device)
        with torch.inference_mode():
            started = time.perf_counter()
            model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                           max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        del model
    generated = len(prompts) * shape.new_tokens
    n = models["parameters"]["student"]
    return {
        "tokens": generated,
        "tokens_per_s": generated / seconds,
        "mfu": utilisation(2 * n, generated / seconds, peak),
        "flop_per_token": f"2N, N = {n:,} (generated tokens; the prompts' prefill is extra)",
        "peak_memory_mib": measured.mib,
    }


# ----------------------------------------------------------------------------- the run


def llama_of(qwen: dict):
    """A Llama configuration of a Qwen2.5 one's sizes. Qwen2 is Llama plus q/k/v biases; the
    bench builds the Llama (0.01% fewer parameters) because transformers gives every `qwen2`
    directory its own BPE tokenizer class, which cannot read the bench's word-level vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(**qwen, attention_bias=False)


def build_models(shape: Shape, work: Path) -> dict:
    """The tokenizer, the student and two teachers (different seeds), and the rows."""

    vocab = shape.student["vocab_size"]
    tokenizer = synthetic.word_tokenizer(work / "tokenizer", vocab)
    found = {
        "student": synthetic.random_model(
            work / "student", llama_of(shape.student), tokenizer, seed=0
        ),
        "teacher_base": synthetic.random_model(
            work / "teacher-base", llama_of(shape.teacher), tokenizer, seed=1
        ),
        "teacher_tuned": synthetic.random_model(
            work / "teacher-tuned", llama_of(shape.teacher), tokenizer, seed=2
        ),
    }
    found["parameters"] = {role: parameters(path) for role, path in list(found.items())}
    return found


def run(shape: Shape, work: Path) -> dict:
    device_name = torch.cuda.get_device_name(0) if shape.device == "cuda" else None
    peak = peak_tflops(device_name)
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(shape, work)
    rows = synthetic.rows(work / "rows.jsonl", shape.rows, shape.prompt_tokens,
                          shape.response_tokens, shape.student["vocab_size"])  # fmt: skip
    stages = {}
    stages["cache-teachers"] = run_cache(shape, models, rows, work, peak)
    stages["distill kd, full"] = run_distill(shape, models, work, lora=False, peak=peak)
    stages["distill kd, LoRA r=16"] = run_distill(shape, models, work, lora=True, peak=peak)
    stages["generation (greedy)"] = run_generation(shape, models, rows, peak)
    return {
        "shape": asdict(shape),
        "device": device_name or "cpu",
        "peak_bf16_tflops": peak,
        "parameters": models["parameters"],
        "stages": stages,
        "machine": machine(),
    }


def render(results: dict) -> str:
    shape = results["shape"]
    peak = results["peak_bf16_tflops"]
    lines = [
        "# GPU benchmark",
        "",
        "Made by `make bench-gpu` (`python bench/gpu_bench.py`): randomly initialised models "
        "from Qwen2.5 configurations (student "
        f"{results['parameters']['student']:,} parameters, teachers "
        f"{results['parameters']['teacher_base']:,} each, vocabulary "
        f"{shape['student']['vocab_size']:,}), synthetic rows of {shape['prompt_tokens']} "
        f"prompt + {shape['response_tokens'] + 1} response tokens, {shape['dtype']}.",
        "",
        f"Device: {results['device']}; dense bf16 peak "
        + (f"{peak:g} TFLOP/s" if peak else "unknown (no MFU)")
        + f". Machine: `{json.dumps(results['machine'])}`",
        "",
        "| stage | tokens | tokens/s | MFU | FLOP per token | peak device memory MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, stage in results["stages"].items():
        mfu = f"{stage['mfu']:.1%}" if stage["mfu"] is not None else "-"
        lines.append(
            f"| {name} | {stage['tokens']:,} | {stage['tokens_per_s']:,.0f} | {mfu} | "
            f"{stage['flop_per_token']} | {stage['peak_memory_mib']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the scaled-down CPU shape")
    parser.add_argument("--work", type=Path, help="where models and runs go")
    parser.add_argument("--out", type=Path, help="the markdown page to write")
    options = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not options.cpu_smoke
    if not on_gpu and not options.cpu_smoke:
        print("no CUDA device: running the scaled-down CPU shape (--cpu-smoke)", flush=True)
    shape = GPU if on_gpu else CPU_SMOKE
    work = options.work or WORKDIR / "gpu" / shape.name
    page = options.out or (REPO / "docs" / "benchmarks-gpu.md" if on_gpu else work / "page.md")
    results = run(shape, work)
    page.write_text(render(results))
    page.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"wrote {page}")
    return results


if __name__ == "__main__":
    main()
