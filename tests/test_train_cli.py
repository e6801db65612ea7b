"""`deltakd distill` and `deltakd finetune` from the command line: outputs, kill -9 and resume,
and one clear line with exit 2 for every bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model
from helpers import assert_one_line_error, flat, run_cli
from safetensors.torch import load_file

from deltakd_cli import faults, models, sources

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def cache_args(tiny, out, student=True) -> list:
    args = [
        "cache-teachers",
        "--teacher-base", tiny.teacher_base,
        "--teacher-tuned", tiny.teacher_tuned,
        "--data", tiny.train,
        "--out", out,
        "--top-k", 8,
        "--device", "cpu",
    ]  # fmt: skip
    return args + (["--student", tiny.student] if student else [])


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-train") / "cache"
    result = run_cli(cache_args(tiny, out))
    assert result.exit_code == 0, result.output
    return out


def distill_args(tiny, cache, out, *extra) -> list:
    return [
        "distill",
        "--cache", cache,
        "--student", tiny.student,
        "--out", out,
        "--lr", "5e-3",
        "--batch-size", 4,
        "--num-workers", 0,
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


def finetune_args(tiny, out, *extra) -> list:
    return [
        "finetune",
        "--model", tiny.student,
        "--data", tiny.train,
        "--out", out,
        "--lr", "1e-2",
        "--batch-size", 4,
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


def load_and_generate(directory: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = tokenizer("the quick brown fox", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    return generated


# ----------------------------------------------------------------------------- outputs


def test_finetune_writes_a_model_dir_that_feeds_cache_teachers(tiny, tmp_path):
    out = tmp_path / "tuned"
    result = run_cli(finetune_args(tiny, out, "--max-steps", 4, "--save-every", 2))
    assert result.exit_code == 0, result.output
    assert "done" in result.output
    for name in ("config.json", "model.safetensors", "generation_config.json", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").is_file()
    assert not (out / ".export.partial").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "finetune" and run["version"]
    assert run["options"]["lr"] == 1e-2 and run["resolved"]["objective"] == "sft"
    assert run["provenance"]["data"]["sha256"] == sources.file_sha256(tiny.train)
    assert run["final_metrics"]["steps"] == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"loss", "sft", "distill", "lr", "tokens_per_s", "grad_norm"} <= set(metrics[0])
    before = load_file(Path(tiny.student) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    load_and_generate(out)
    # the finetuned model is a valid tuned teacher for the cache
    cache_out = tmp_path / "cache-from-tuned"
    args = cache_args(tiny, cache_out, student=False)
    args[args.index("--teacher-tuned") + 1] = out
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((cache_out / "manifest.json").read_text())
    assert manifest["provenance"]["teacher_tuned"]["weights_sha256"] == models.weights_fingerprint(
        str(out)
    )


def test_distill_exports_a_loadable_model_with_provenance(tiny, cache, tmp_path):
    out = tmp_path / "distilled"
    result = run_cli(distill_args(tiny, cache, out, "--max-steps", 3, "--objective", "delta"))
    assert result.exit_code == 0, result.output
    load_and_generate(out)
    run = json.loads((out / "run.json").read_text())
    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    assert run["provenance"]["cache_provenance"] == manifest["provenance"]
    assert run["resolved"]["use_cached_student"] is True
    assert run["resolved"]["frozen_student"] is False
    assert run["options"]["objective"] == "delta"
    card = (out / "README.md").read_text()  # the model card
    assert "Delta-KD" in card and run["student"]["weights_sha256"][:12] in card


@pytest.mark.slow
def test_kill_9_then_resume_ends_with_identical_weights(tiny, cache, tmp_path, monkeypatch):
    """A real process dies by SIGKILL while writing its second checkpoint (the first one is
    complete); --resume must pick the complete one and end bit-identical to a clean run."""
    common = ["--max-steps", 6, "--save-every", 2, "--objective", "delta", "--sft-weight", 0.2]
    clean = tmp_path / "clean"
    trace = tmp_path / "trace"
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    faults.reset()
    result = run_cli(distill_args(tiny, cache, clean, *common))
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
    args = [str(a) for a in distill_args(tiny, cache, killed, *common)]
    process = subprocess.run(
        [sys.executable, "-m", "deltakd_cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == -9, process.stderr
    checkpoints = killed / "checkpoints"
    assert (checkpoints / "step-2" / "state.json").is_file()
    assert (checkpoints / ".step-4.partial").is_dir()  # the kill hit it half-written
    assert not (checkpoints / "step-4").exists() and not (killed / "run.json").exists()

    result = run_cli(distill_args(tiny, cache, killed, *common, "--resume"))
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "step-2" in result.output

    resumed = load_file(killed / "model.safetensors")
    reference = load_file(clean / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    metrics = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    # the last two kept: step-6 is the final step's (a finished run can be trained further)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-4", "step-6"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "0"], "--lr must be > 0"),
        (["--lr", "-1e-3"], "--lr must be > 0"),
        (["--sft-weight", "1.5"], "--sft-weight must be between 0 and 1"),
        (["--objective", "nope"], "unknown --objective 'nope'"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--grad-accum", "0"], "--grad-accum must be at least 1"),
        (["--dtype", "float16"], "float16 is not supported for training"),
        (["--warmup", "2.5"], "--warmup is a fraction"),
        (["--objective", "delta-mse", "--temperature", "2"], "takes no --temperature"),
    ],
)
def test_bad_numbers(tiny, cache, tmp_path, extra, message):
    result = run_cli(distill_args(tiny, cache, tmp_path / "out", *extra))
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_missing_student_cache_and_data(tiny, cache, tmp_path):
    args = distill_args(tiny, cache, tmp_path / "out")
    args[args.index("--student") + 1] = tmp_path / "no-student"
    assert_one_line_error(run_cli(args), "model not found")
    assert_one_line_error(
        run_cli(distill_args(tiny, tmp_path / "no-cache", tmp_path / "out")), "cache not found"
    )
    args = finetune_args(tiny, tmp_path / "out")
    args[args.index("--data") + 1] = tmp_path / "none.jsonl"
    assert_one_line_error(run_cli(args), "data file not found")


def test_unfinished_and_damaged_caches_are_refused(tiny, cache, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(cache, unfinished)
    (unfinished / "manifest.json").unlink()
    assert_one_line_error(run_cli(distill_args(tiny, unfinished, tmp_path / "o1")), "unfinished")
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    chunks = sorted((damaged / "shards").glob("*.zarr/tuned_logprobs/c/**/*"))
    chunk = next(p for p in chunks if p.is_file())
    content = bytearray(chunk.read_bytes())
    content[-1] ^= 0xFF
    chunk.write_bytes(bytes(content))
    assert_one_line_error(
        run_cli(distill_args(tiny, damaged, tmp_path / "o2")), "fails verification"
    )


def test_cache_of_another_student_needs_no_cached_student(tiny, cache, tmp_path):
    tokenizer = models.load_tokenizer(str(tiny.student))
    other = build_model(tmp_path / "student-b", tokenizer, 1, 32, seed=11)
    args = distill_args(tiny, cache, tmp_path / "out", "--objective", "delta", "--max-steps", 2)
    args[args.index("--student") + 1] = other
    assert_one_line_error(run_cli(args), "another student", "--frozen-student")
    result = run_cli([*args, "--frozen-student"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["resolved"]["frozen_student"] is True
    # kd does not use the cached student, so the other student is fine there
    kd_args = distill_args(tiny, cache, tmp_path / "kd", "--objective", "kd", "--max-steps", 1)
    kd_args[kd_args.index("--student") + 1] = other
    assert run_cli(kd_args).exit_code == 0


def test_resume_rules(tiny, cache, tmp_path):
    out = tmp_path / "out"
    common = ["--max-steps", 4, "--save-every", 2]
    assert_one_line_error(
        run_cli(distill_args(tiny, cache, out, *common, "--resume")), "no complete checkpoint"
    )
    # leave a run with a checkpoint but no final export, as a crash would
    result = run_cli(distill_args(tiny, cache, out, *common))
    assert result.exit_code == 0, result.output
    (out / "run.json").unlink()
    assert_one_line_error(
        run_cli(distill_args(tiny, cache, out, *common)), "pass --resume to continue"
    )
    changed = distill_args(tiny, cache, out, *common, "--resume")
    changed[changed.index("--lr") + 1] = "1e-3"
    assert_one_line_error(run_cli(changed), "--lr changed", "was 0.005, now 0.001")
    shorter = distill_args(tiny, cache, out, "--max-steps", 3, "--save-every", 2, "--resume")
    assert_one_line_error(run_cli(shorter), "--max-steps changed", "was 4, now 3")
    result = run_cli(distill_args(tiny, cache, out, *common, "--resume"))
    assert result.exit_code == 0, result.output
    assert_one_line_error(
        run_cli(distill_args(tiny, cache, out, *common, "--resume")), "trains it further only"
    )


def test_non_finite_loss_stops_and_names_the_newest_sound_checkpoint(tiny, tmp_path):
    """The stop names the newest checkpoint whose weights are all finite, with its largest
    weight (a diverging run's finite weights can be huge: it never calls them "good")."""
    out = tmp_path / "diverged"
    args = finetune_args(tiny, out, "--max-steps", 10, "--save-every", 1, "--warmup", 0)
    args[args.index("--lr") + 1] = "1e30"
    result = run_cli([*args, "--max-grad-norm", 0])
    assert_one_line_error(result, "non-finite", "training stopped", "finite weights")
    assert "good" not in result.output
    assert not (out / "run.json").exists()
    steps = sorted(p for p in (out / "checkpoints").iterdir())
    assert steps and all(p.name.startswith("step-") for p in steps)
    named = [p for p in steps if f"{p}" in flat(result.output)]
    assert len(named) == 1
    weights = torch.load(named[0] / "model.pt", weights_only=True)
    largest = max(float(t.abs().max()) for t in weights.values() if t.is_floating_point())
    assert math.isfinite(largest) and f"largest weight is {largest:.3g}" in flat(result.output)


def test_fsdp_without_torchrun_is_refused(tiny, cache, tmp_path):
    result = run_cli(distill_args(tiny, cache, tmp_path / "out", "--fsdp"))
    assert_one_line_error(result, "--fsdp", "launch with torchrun")


def test_batch_shapes_that_cannot_work_are_refused(tiny, cache, tmp_path):
    result = run_cli(distill_args(tiny, cache, tmp_path / "o1", "--max-tokens-per-batch", 8))
    assert_one_line_error(result, "smaller than the longest example")
    result = run_cli(distill_args(tiny, cache, tmp_path / "o2", "--grad-accum", 100))
    assert_one_line_error(result, "fewer than one optimizer step")


def test_token_budget_batches_train(tiny, cache, tmp_path):
    out = tmp_path / "budget"
    args = distill_args(tiny, cache, out, "--max-tokens-per-batch", 400, "--max-steps", 3)
    args[args.index("--batch-size") : args.index("--batch-size") + 2] = []
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["options"]["batch_size"] is None


# ----------------------------------------------------------------------------- kd-to-delta


def test_distill_kd_to_delta_uses_the_grid_or_says_it_falls_back(tiny, tmp_path):
    cache = tmp_path / "grid-cache"
    result = run_cli(cache_args(tiny, cache) + ["--gammas", "0,0.5,1"])
    assert result.exit_code == 0, result.output
    note = "is not a grid point of the cache"
    on_grid = tmp_path / "on-grid"
    args = ("--objective", "kd-to-delta", "--gamma", "0.5", "--max-steps", 2)
    result = run_cli(distill_args(tiny, cache, on_grid, *args))
    assert result.exit_code == 0, result.output
    assert note not in flat(result.output)
    run = json.loads((on_grid / "run.json").read_text())
    assert run["options"]["gamma"] == 0.5 and run["options"]["objective"] == "kd-to-delta"
    assert run["provenance"]["cache"]["grid"]["points"] == [[0.0, 1.0], [0.5, 1.0], [1.0, 1.0]]
    metrics = [json.loads(line) for line in (on_grid / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["distill"]) and m["distill"] > 0 for m in metrics)
    off_grid = tmp_path / "off-grid"
    args = ("--objective", "kd-to-delta", "--gamma", "0.25", "--max-steps", 1)
    result = run_cli(distill_args(tiny, cache, off_grid, *args))
    assert result.exit_code == 0, result.output
    # its default tail (corrected) uses the draws: their normaliser is then estimated, and said
    assert flat(result.output).count("the cache does not know the normaliser") == 1
    bucket = run_cli(distill_args(tiny, cache, tmp_path / "off-grid-bucket", *args, "--tail",
                                  "bucket"))  # fmt: skip
    assert bucket.exit_code == 0, bucket.output
    assert flat(bucket.output).count(note) == 1  # the bucket falls back to the Hölder bound
    bad = run_cli(distill_args(tiny, cache, tmp_path / "bad", "--objective", "kd-to-delta",
                               "--gamma", "1.5"))  # fmt: skip
    assert_one_line_error(bad, "--gamma")


def test_resume_trains_a_finished_run_further_from_a_moved_cache(tiny, cache, tmp_path):
    """--resume with a larger --max-steps continues a finished run (the schedule's new length
    noted and recorded); a cache moved to another path is the same cache (its manifest hash):
    the run resumes from it and ends with the same weights as from the original path."""
    moved = tmp_path / "moved-cache"
    shutil.copytree(cache, moved)
    ends = {}
    for name, source in (("here", cache), ("moved", moved)):
        out = tmp_path / name
        first = run_cli(distill_args(tiny, cache, out, "--max-steps", 2, "--save-every", 2))
        assert first.exit_code == 0, first.output
        further = run_cli(distill_args(tiny, source, out, "--max-steps", 4, "--save-every", 2,
                                       "--resume"))  # fmt: skip
        assert further.exit_code == 0, further.output
        text = flat(further.output)
        assert "training further (--max-steps 2 -> 4)" in text and "spans 4 steps (was 2" in text
        run = json.loads((out / "run.json").read_text())
        resumed = run["resolved"]["resumed"]
        assert resumed["from_step"] == 2 and resumed["extended"] == {"max_steps": [2, 4]}
        assert resumed["schedule"]["total_steps"] == [2, 4]
        assert run["final_metrics"]["steps"] == 4
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()
                 if "loss" in json.loads(line)]  # fmt: skip
        assert max(steps) == 4
        if name == "moved":
            assert "the cache moved" in text
            assert resumed["cache_moved"] == [str(cache), str(moved)]
        ends[name] = load_file(out / "model.safetensors")
    assert all(torch.equal(ends["here"][k], ends["moved"][k]) for k in ends["here"])
