"""LoRA students (--lora-r, through peft): only the adapters train, the export is the merged
model and equals base + adapter, the adapter-disabled S0 equals a frozen copy, DDP and kill -9
with --resume give the same weights, and every bad input is one line."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli, torchrun
from safetensors.torch import load_file
from torch import nn

from deltakd_cli import faults, models
from deltakd_cli.errors import DeltakdError
from deltakd_cli.outputs import MARKER
from deltakd_cli.train.options import DEFAULT_LORA_TARGETS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 4


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    """A teachers-only cache: the delta objective then runs the live S0, which for a LoRA
    student is the student with its adapters switched off. A tail bucket: drawn from pT alone, a
    sampled tail would serve Delta with self-normalised, heavy-tailed weights (docs/method.md),
    noise this test of the adapters does not need."""
    out = tmp_path_factory.mktemp("lora") / "cache"
    args = [
        "cache-teachers",
        "--teacher-base", tiny.teacher_base,
        "--teacher-tuned", tiny.teacher_tuned,
        "--data", tiny.train,
        "--out", out,
        "--top-k", 8,
        "--tail-samples", 0,
        "--device", "cpu",
    ]  # fmt: skip
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    return out


def lora_args(tiny, cache, out, *extra) -> list:
    return [
        "distill",
        "--cache", cache,
        "--student", tiny.student,
        "--out", out,
        "--lora-r", RANK,
        "--lr", "3e-2",
        "--batch-size", 4,
        "--num-workers", 0,
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny, cache, tmp_path_factory):
    """One LoRA delta run (live S0) that also writes the adapter alone."""
    out = tmp_path_factory.mktemp("lora-run") / "out"
    result = run_cli(
        lora_args(
            tiny,
            cache,
            out,
            "--max-steps",
            6,
            "--sft-weight",
            0.5,
            "--lr",
            "5e-2",
            "--save-adapter",
        )
    )
    assert result.exit_code == 0, result.output
    return out


def targeted_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The plain model's linear layers that LoRA targets, by full name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


# ----------------------------------------------------------------------------- training, export


def test_lora_distill_lowers_the_loss_and_trains_only_the_adapters(tiny, trained):
    losses = [
        json.loads(line)["loss"] for line in (trained / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 6 and losses[-1] < losses[0]
    run = json.loads((trained / "run.json").read_text())
    recorded = run["resolved"]["lora"]
    assert recorded["r"] == RANK and recorded["alpha"] == 2 * RANK
    assert recorded["target_modules"] == DEFAULT_LORA_TARGETS.split(",")
    assert run["resolved"]["frozen_student"] is True

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny.student)
    layers = targeted_linears(plain, recorded["target_modules"])
    assert not any(name.startswith("lm_head") for name in layers)
    expected = sum(RANK * (m.in_features + m.out_features) for m in layers.values())
    assert recorded["trainable_parameters"] == expected

    # the merged export differs from S0 exactly in the targeted layers' weights
    before = load_file(Path(tiny.student) / "model.safetensors")
    after = load_file(trained / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"{name}.weight" for name in layers}


def test_merged_export_equals_base_plus_saved_adapter(tiny, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(trained).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny.student)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.randint(0, tiny.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :4]
    generated = merged.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt.shape[1]


def test_adapter_disabled_s0_equals_a_frozen_copy(tiny, cache):
    """The live-S0 delta loss and its gradients are the same whether S0 is the LoRA student with
    its adapters off or a separate frozen copy of the student (adapters made non-zero, so the
    student and S0 differ)."""
    from deltakd_cli.cache.reader import CacheReader
    from deltakd_cli.method.spec import CacheFacts
    from deltakd_cli.train import batching, lora
    from deltakd_cli.train.objective import ObjectiveModule
    from deltakd_cli.train.options import DistillOptions

    options = DistillOptions(
        cache=str(cache), student=str(tiny.student), out="unused", lora_r=RANK, sft_weight=0.2
    )
    settings = lora.settings_of(options)
    reader = CacheReader(str(cache))
    examples = reader.read_examples(0, 0, 4)
    batch = batching.collate(examples, tiny.tokenizer.pad_token_id, False)
    vocab_size = int(reader.manifest["vocab_size"])

    def module_and_grads(adapter_disabled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = models.load_model(str(tiny.student), torch.float32, torch.device("cpu"))
        frozen = None if adapter_disabled else copy.deepcopy(student).requires_grad_(False)
        torch.manual_seed(0)  # the same adapters' A in both
        student = lora.add_adapters(student, settings)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, parameter in student.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        student.train()
        module = ObjectiveModule(
            student,
            options,
            vocab_size,
            torch.float32,
            frozen,
            CacheFacts(alpha=reader.manifest.get("alpha")),
            frozen_is_adapter_disabled=adapter_disabled,
        )
        sums = module(batch)
        sums[0].backward()
        grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
        return sums.detach(), grads

    sums_off, grads_off = module_and_grads(adapter_disabled=True)
    sums_copy, grads_copy = module_and_grads(adapter_disabled=False)
    assert float(sums_off[2]) > 0  # a distill part that depends on S0
    torch.testing.assert_close(sums_off, sums_copy, rtol=0, atol=0)
    assert grads_off.keys() == grads_copy.keys() and grads_off
    for name in grads_off:
        torch.testing.assert_close(grads_off[name], grads_copy[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------- DDP, resume


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=atol)


@pytest.mark.slow
def test_lora_two_ranks_match_one_process_with_accumulation(tiny, cache, tmp_path):
    two = tmp_path / "ddp"
    process = torchrun(lora_args(tiny, cache, two, "--max-steps", 3))
    assert process.returncode == 0, process.stderr[-3000:]
    one = tmp_path / "single"
    result = run_cli(lora_args(tiny, cache, one, "--max-steps", 3, "--grad-accum", 2))
    assert result.exit_code == 0, result.output
    assert json.loads((two / "run.json").read_text())["resolved"]["world_size"] == 2
    assert_same_weights(two, one, atol=1e-6)
    before = load_file(Path(tiny.student) / "model.safetensors")
    after = load_file(two / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train


@pytest.mark.slow
def test_lora_fsdp2_matches_one_process_and_resumes(tiny, cache, tmp_path):
    """FSDP2 shards the PeftModel's decoder layers (frozen weights and adapters together); the
    adapter-disabled S0 runs through the same shards."""
    sharded = tmp_path / "fsdp"
    extra = ("--max-steps", 3, "--fsdp", "--save-every", 2)
    process = torchrun(lora_args(tiny, cache, sharded, *extra))
    assert process.returncode == 0, process.stderr[-3000:]
    one = tmp_path / "single"
    result = run_cli(lora_args(tiny, cache, one, "--max-steps", 3, "--grad-accum", 2))
    assert result.exit_code == 0, result.output
    assert_same_weights(sharded, one, atol=1e-6)
    before = load_file(Path(tiny.student) / "model.safetensors")
    after = load_file(sharded / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(sharded / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    shutil.copy(sharded / MARKER, resumed / MARKER)  # resume only into a folder deltakd made
    process = torchrun(lora_args(tiny, cache, resumed, *extra, "--resume"))
    assert process.returncode == 0, process.stderr[-3000:]
    assert "resuming from" in process.stderr + process.stdout
    assert_same_weights(resumed, sharded, atol=0)


@pytest.mark.slow
def test_lora_kill_9_then_resume_ends_with_identical_weights(tiny, cache, tmp_path, monkeypatch):
    common = ["--max-steps", 6, "--save-every", 2, "--sft-weight", 0.2, "--save-adapter"]
    clean = tmp_path / "clean"
    trace = tmp_path / "trace"
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    faults.reset()
    result = run_cli(lora_args(tiny, cache, clean, *common))
    monkeypatch.delenv(faults.TRACE_ENV)
    assert result.exit_code == 0, result.output
    points = trace.read_text().splitlines()
    second_optimizer = [i for i, p in enumerate(points, 1) if p == "checkpoint optimizer.pt"][1]
    killed = tmp_path / "killed"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        faults.FAULT_ENV: f"kill@{second_optimizer}",
    }
    args = [str(a) for a in lora_args(tiny, cache, killed, *common)]
    process = subprocess.run(
        [sys.executable, "-m", "deltakd_cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == -9, process.stderr
    assert (killed / "checkpoints" / "step-2" / "state.json").is_file()
    assert not (killed / "run.json").exists()

    result = run_cli(lora_args(tiny, cache, killed, *common, "--resume"))
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "step-2" in result.output
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        resumed, reference = load_file(killed / name), load_file(clean / name)
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), (name, key)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-r", "-1"], "--lora-r must be >= 0"),
        (["--lora-r", "0", "--save-adapter"], "--save-adapter needs --lora-r"),
        (["--lora-r", "0", "--lora-alpha", "8"], "--lora-alpha needs --lora-r"),
        (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        (
            ["--lora-target-modules", "q_proj,qkv"],
            "qkv matches no linear layer of the student's decoder layers (they have: down_proj,",
        ),
        (["--lora-target-modules", "lm_head"], "lm_head matches no linear layer"),
        (["--lora-4bit"], "--lora-4bit needs a CUDA device and bitsandbytes"),
    ],
)
def test_bad_lora_inputs(tiny, cache, tmp_path, extra, message):
    result = run_cli(lora_args(tiny, cache, tmp_path / "out", "--max-steps", 1, *extra))
    assert_one_line_error(result, message)


def test_lora_without_peft_is_one_line(tiny, cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    result = run_cli(lora_args(tiny, cache, tmp_path / "out", "--max-steps", 1))
    assert_one_line_error(result, "--lora-r needs peft: pip install 'deltakd[lora]'")


def _interrupted_run(tiny, cache, out: Path, *extra) -> None:
    """A run with a complete checkpoint at step 1 and no record, as a kill would leave it."""
    result = run_cli(lora_args(tiny, cache, out, "--max-steps", 2, "--save-every", 1, *extra))
    assert result.exit_code == 0, result.output
    (out / "run.json").unlink()


def test_resume_refuses_to_switch_lora_on_or_off(tiny, cache, tmp_path):
    lora_run = tmp_path / "lora"
    _interrupted_run(tiny, cache, lora_run)
    result = run_cli(lora_args(tiny, cache, lora_run, "--max-steps", 2, "--save-every", 1,
                               "--resume", "--lora-r", 0))  # fmt: skip
    assert_one_line_error(result, "step-2 is of a LoRA run (--lora-r 4)", "same --lora-*")

    full_run = tmp_path / "full"
    _interrupted_run(tiny, cache, full_run, "--lora-r", 0)
    result = run_cli(
        lora_args(tiny, cache, full_run, "--max-steps", 2, "--save-every", 1, "--resume")
    )
    assert_one_line_error(result, "trained every weight (no --lora-r)", "without --lora-r 4")

    result = run_cli(lora_args(tiny, cache, lora_run, "--max-steps", 2, "--save-every", 1,
                               "--resume", "--lora-r", 8))  # fmt: skip
    assert_one_line_error(result, "--lora-r changed since step-2 (was 4, now 8)")


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_passes_lora_to_the_student_stages_only():
    from deltakd_cli.options import to_argv
    from deltakd_cli.pipeline import plan
    from deltakd_cli.pipeline.options import PipelineOptions

    options = PipelineOptions(
        teacher_base="base", teacher_tuned="tuned", student="student", train="a", test="b",
        out="runs", lora_r=8, lora_dropout=0.1, lora_target_modules="q_proj,v_proj",
    )  # fmt: skip
    stages, _ = plan.plan_stages(options)
    students = [stage for stage in stages if stage.command == "distill"]
    assert students
    for stage in students:
        argv = to_argv(stage.options)
        for flag, value in (("--lora-r", "8"), ("--lora-dropout", "0.1")):
            assert argv[argv.index(flag) + 1] == value
        assert argv[argv.index("--lora-target-modules") + 1] == "q_proj,v_proj"
    assert all("--lora-r" not in to_argv(s.options) for s in stages if s.command != "distill")
    with pytest.raises(DeltakdError, match="--lora-dropout needs --lora-r"):
        plan.check_inputs(PipelineOptions(
            teacher_base="base", student="student", train="a", test="b", lora_dropout=0.1
        ))  # fmt: skip
