"""The training loop's pieces against independent references: the chunked objective vs a plain
full-logits forward, accumulation invariance, the schedule, and each objective lowering its loss."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_model
from helpers import cache_args, run_cli

from deltakd_cli import data, models
from deltakd_cli.cache.reader import CacheReader
from deltakd_cli.method import objectives, targets
from deltakd_cli.method.spec import CacheFacts, TargetSpec, tail_estimator
from deltakd_cli.method.view import build_view
from deltakd_cli.train import batching, checkpoint, loop
from deltakd_cli.train import step as step_math
from deltakd_cli.train.objective import (
    ObjectiveModule,
    chunk_loss,
    enable_activation_checkpointing,
)
from deltakd_cli.train.options import DistillOptions, FinetuneOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def build_cache(tiny, out, *, student: bool, top_k: int = 8, extra=()):
    result = run_cli(cache_args(tiny, out, "--top-k", top_k, *extra, student=student))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def caches(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-caches")
    return {
        "student": build_cache(tiny, root / "with-student", student=True),
        "teachers": build_cache(tiny, root / "teachers-only", student=False),
        "grid": build_cache(
            tiny, root / "grid", student=True, extra=("--gammas", "0,0.5,1", "--alphas", "1.5")
        ),
    }


def options(**overrides) -> DistillOptions:
    values = {"out": "unused", "cache": "unused", "student": "unused", "objective": "sft"}
    values.update(overrides)
    return DistillOptions(**values)


def facts_of(store) -> CacheFacts:
    """What the cache says about its targets, as `distill` reads it."""
    alpha = store.manifest.get("alpha")  # None: a teacher-only cache has no mass-matched tail
    return CacheFacts(None if alpha is None else float(alpha), store.grid_points, store.temperature)


def default_tail(objective: str, store):
    """The tail `distill` trains without --tail: the objective's default on a cache with draws,
    else the bucket."""
    name = objectives.get(objective).default_tail if store.tail_samples else "bucket"
    return tail_estimator(name)


def all_examples(store) -> list:
    return [
        example
        for shard in range(store.num_shards)
        for example in store.read_examples(shard, 0, len(store.shard_lengths(shard)))
    ]


def reference_sums(student, batch, objective, vocab_size, frozen=None, **loss_options):
    """The same loss from the model's ordinary forward: full [B, L, V] logits, no chunks."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    picked = logits[batch["target_batch"], batch["target_pos"]][:, :vocab_size]
    frozen_logits = None
    if frozen is not None:
        with torch.no_grad():
            full = frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            frozen_logits = full.logits[batch["target_batch"], batch["target_pos"]][:, :vocab_size]
    given = {
        name: loss_options.pop(name) for name in objectives.setting_fields() if name in loss_options
    }
    settings = objectives.get(objective).settings_from({**objectives.setting_defaults(), **given})
    parts = chunk_loss(
        objective,
        picked,
        batch["labels"],
        batch["cached"],
        settings=settings,
        frozen_student_logits=frozen_logits,
        **loss_options,
    )
    return parts["loss"].sum(), parts["sft"].sum(), parts["distill"].sum()


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    factors = [step_math.lr_factor(step, 4, 20) for step in range(20)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0)
    assert factors[12] == pytest.approx(0.5)  # halfway through the decay
    assert all(a > b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert factors[-1] > 0
    assert step_math.warmup_steps_of(0.1, 50) == 5 and step_math.warmup_steps_of(7, 50) == 7


@pytest.mark.parametrize(
    "objective, cache_kind, frozen, tail_name",
    [("sft", None, False, None), ("kd", "student", False, "sampled"),
     ("delta", "student", False, "corrected"), ("delta", "teachers", True, "sampled"),
     ("delta-mix", "student", False, "bucket"), ("kd-to-delta", "grid", False, "corrected"),
     ("kd-to-delta", "teachers", True, "bucket"), ("kd-to-delta", "student", False, "sampled")],
)  # fmt: skip
def test_chunked_objective_equals_a_full_logits_forward(
    tiny, caches, objective, cache_kind, frozen, tail_name
):
    tokenizer = models.load_tokenizer(str(tiny.student))
    if cache_kind is None:
        tokenized = data.tokenize_all(data.load_examples(tiny.train), "alpaca", tokenizer, 256)
        store = batching.TokenizedStore(tokenized)
        facts, tail = CacheFacts(), None
    else:
        store = CacheReader(str(caches[cache_kind]))
        assert store.tail_samples > 0  # every tail can be trained from these caches
        facts, tail = facts_of(store), tail_estimator(tail_name)
    if cache_kind == "grid":
        assert facts.grid == ((0.0, 1.5), (0.5, 1.5), (1.0, 1.5))
    batch = batching.collate(all_examples(store)[5:11], tokenizer.pad_token_id)
    if cache_kind == "grid":  # the loss reads the exact family tail at (gamma 0.5, alpha 1.5)
        assert batch["cached"].family_tail_logmass.shape == (batch["num_targets"], 3)
    student = models.load_model(str(tiny.student))
    frozen_model = models.load_model(str(tiny.student)) if frozen else None
    loss_options = {"alpha": 1.5, "temperature": 1.0, "sft_weight": 0.25, "mix": 0.5, "gamma": 0.5}
    expected = reference_sums(
        student, batch, objective, tiny.vocab_size, frozen_model, facts=facts, tail=tail,
        **loss_options,
    )  # fmt: skip
    expected[0].backward()
    expected_grads = gradients(student)
    for chunk in (0, 4):  # one chunk, and chunks of 4 positions under activation checkpointing
        student.zero_grad(set_to_none=True)
        module = ObjectiveModule(
            student,
            options(objective=objective, logit_chunk_size=chunk, **loss_options),
            tiny.vocab_size,
            torch.float32,
            frozen_model,
            facts,
            tail=tail,
        )
        sums = module(batch)
        for got, want in zip(sums, expected, strict=True):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        sums[0].backward()
        for name, grad in gradients(student).items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(tiny, caches):
    tokenizer = models.load_tokenizer(str(tiny.student))
    store = CacheReader(str(caches["student"]))
    batch = batching.collate(all_examples(store)[:4], tokenizer.pad_token_id)
    results = []
    for recompute in (False, True):
        student = models.load_model(str(tiny.student))
        if recompute:
            enable_activation_checkpointing(student)
        student.train()
        module = ObjectiveModule(student, options(objective="kd"), tiny.vocab_size, torch.float32)
        calls = []
        mlp = student.model.layers[0].mlp
        mlp_forward = mlp.forward
        mlp.forward = lambda hidden, run=mlp_forward, seen=calls: seen.append(1) or run(hidden)
        module(batch)[0].backward()
        assert len(calls) == (2 if recompute else 1)  # the layer really ran again in backward
        results.append(gradients(student))
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name])


def test_padded_output_layer_is_sliced_to_the_tokenizer(tiny, tmp_path):
    tokenizer = models.load_tokenizer(str(tiny.student))
    padded_dir = build_model(tmp_path / "padded", tokenizer, 1, 32, seed=4, vocab_rows=352)
    student = models.load_model(str(padded_dir))
    assert models.model_vocab_size(student) == 352
    tokenized = data.tokenize_all(data.load_examples(tiny.train), "alpaca", tokenizer, 256)
    batch = batching.collate(batching.TokenizedStore(tokenized).examples[:5], 0)
    module = ObjectiveModule(student, options(), tiny.vocab_size, torch.float32)
    expected = reference_sums(student, batch, "sft", tiny.vocab_size)
    torch.testing.assert_close(module(batch)[0], expected[0].detach())
    unsliced = reference_sums(student, batch, "sft", 352)
    assert not torch.allclose(unsliced[0], expected[0])  # the extra rows would change the loss


def test_one_batch_of_four_equals_two_micro_batches_of_two(tiny, caches):
    """Same gradients and the same AdamW update however the step is split."""
    tokenizer = models.load_tokenizer(str(tiny.student))
    store = CacheReader(str(caches["student"]))
    examples = all_examples(store)[2:6]
    halves = [examples[:2], examples[2:]]
    whole = batching.collate(examples, tokenizer.pad_token_id)
    parts = [batching.collate(half, tokenizer.pad_token_id) for half in halves]
    assert parts[0]["num_targets"] != parts[1]["num_targets"]  # unequal halves: weights matter
    global_targets = whole["num_targets"]
    results = []
    lr = 1e-2
    for micro_batches in ([whole], parts):
        student = models.load_model(str(tiny.student))
        before = {name: p.detach().clone() for name, p in student.named_parameters()}
        run_options = options(objective="delta", lr=lr, sft_weight=0.3)
        module = ObjectiveModule(
            student, run_options, tiny.vocab_size, torch.float32, None, facts_of(store),
            tail=default_tail("delta", store),
        )  # fmt: skip
        optimizer = step_math.make_optimizer(module, run_options)
        totals = step_math.accumulate_gradients(
            module, micro_batches, global_targets, 1, torch.device("cpu")
        )
        grads = gradients(student)
        optimizer.step()
        # AdamW's first step from these gradients: lr * g / (|g| + eps) (bias-corrected moments
        # of one step are g and g^2; no weight decay here).
        for name, parameter in student.named_parameters():
            expected = before[name] - lr * grads[name] / (grads[name].abs() + 1e-8)
            torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-6)
        results.append((totals / global_targets, grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    # The same gradients however the step is split (the update is a function of them, checked
    # above; comparing updates directly would amplify rounding where a gradient is ~eps).
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)
    # and the gradient is that of the token mean over the whole step (not a mean of means)
    student = models.load_model(str(tiny.student))
    reference = reference_sums(
        student, whole, "delta", tiny.vocab_size, facts=facts_of(store),
        tail=default_tail("delta", store), alpha=1.0, sft_weight=0.3,
    )  # fmt: skip
    (reference[0] / global_targets).backward()
    for name, grad in gradients(student).items():
        torch.testing.assert_close(grads_a[name], grad, rtol=1e-4, atol=1e-7)


def mean_objective_loss(
    model_dir, store, objective, vocab, *, frozen_dir=None, facts=CacheFacts(), tail=None
):
    """The objective's token-mean loss over all of the store's examples."""
    student = models.load_model(str(model_dir))
    frozen = models.load_model(str(frozen_dir)) if frozen_dir else None
    module = ObjectiveModule(
        student, options(objective=objective), vocab, torch.float32, frozen, facts, tail=tail
    )
    examples = all_examples(store)
    total, targets = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            batch = batching.collate(examples[start : start + 8], 0, with_student=frozen is None)
            total += float(module(batch)[0])
            targets += batch["num_targets"]
    return total / targets


@pytest.mark.parametrize(
    "objective, cache_kind, frozen_student",
    [("sft", "student", False), ("kd", "student", False), ("delta", "student", False),
     ("delta", "teachers", False), ("delta", "student", True)],
)  # fmt: skip
@pytest.mark.slow
def test_each_objective_lowers_its_loss(tiny, caches, tmp_path, objective, cache_kind,
                                        frozen_student):  # fmt: skip
    out = tmp_path / "out"
    run_options = DistillOptions(
        cache=str(caches[cache_kind]),
        out=str(out),
        student=str(tiny.student),
        objective=objective,
        lr=5e-3,
        epochs=3,
        batch_size=4,
        warmup=0.1,
        save_every=0,
        num_workers=0,
        frozen_student=frozen_student,
    )
    summary = loop.distill(run_options)
    frozen = summary["resolved"]["frozen_student"]
    assert frozen == (objective == "delta" and (cache_kind == "teachers" or frozen_student))
    store = CacheReader(str(caches[cache_kind]))
    tail = tail_estimator(summary["resolved"]["tail"])  # the loss the run trained
    assert tail == default_tail(objective, store)
    measure = {
        "frozen_dir": tiny.student if frozen else None,
        "facts": facts_of(store),
        "tail": tail,
    }
    before = mean_objective_loss(tiny.student, store, objective, tiny.vocab_size, **measure)
    after = mean_objective_loss(out, store, objective, tiny.vocab_size, **measure)
    assert after < 0.75 * before, (before, after)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, summary["resolved"]["total_steps"] + 1))


def test_finetune_lowers_the_cross_entropy(tiny, tmp_path):
    out = tmp_path / "tuned"
    run_options = FinetuneOptions(
        out=str(out), model=str(tiny.student), data=str(tiny.train), max_length=256, lr=1e-2,
        epochs=2, batch_size=4, save_every=0,
    )  # fmt: skip
    loop.finetune(run_options)
    tokenizer = models.load_tokenizer(str(tiny.student))
    tokenized = data.tokenize_all(data.load_examples(tiny.train), "alpaca", tokenizer, 256)
    store = batching.TokenizedStore(tokenized)
    before = mean_objective_loss(tiny.student, store, "sft", tiny.vocab_size)
    after = mean_objective_loss(out, store, "sft", tiny.vocab_size)
    assert after < 0.8 * before, (before, after)


def test_only_complete_checkpoints_are_found(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name, complete in [("step-4", True), ("step-10", True), (".step-12.partial", True),
                           ("step-14", False), ("notes", True)]:  # fmt: skip
        (checkpoints / name).mkdir(parents=True)
        if complete:
            (checkpoints / name / "state.json").write_text("{}")
    found = checkpoint.complete_checkpoints(tmp_path)
    assert [step for step, _ in found] == [4, 10]
    shutil.rmtree(checkpoints)
    assert checkpoint.complete_checkpoints(tmp_path) == []


# ----------------------------------------------------------------------------- frozen route


def teacher_logprobs(model_dir, batch, vocab_size):
    model = models.load_model(str(model_dir), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    picked = logits[batch["target_batch"], batch["target_pos"]][:, :vocab_size]
    return torch.log_softmax(picked.float(), dim=-1)


@pytest.mark.parametrize("top_k", ["vocab", 8])
def test_frozen_student_on_another_students_cache_uses_no_foreign_tail(tiny, tmp_path, top_k):
    """`--frozen-student` with a cache built for another base student: the cache's mass-matched
    tail (computed with that student) is not used; the target is the live S0's. At k = |V| it
    is exactly the dense p* ∝ p0 (pT / pB)^alpha of the live S0; at k < |V| the bucket follows
    the teacher rule and the draws carry the live S0's own p*, normalised by the draws (the
    cache knows no normaliser for this student)."""
    k = tiny.vocab_size if top_k == "vocab" else top_k
    cache = tmp_path / "cache"
    result = run_cli(cache_args(tiny, cache, "--top-k", k, "--precision", "float32"))
    assert result.exit_code == 0, result.output
    other = build_model(tmp_path / "other-student", tiny.tokenizer, 1, 32, seed=11)
    tokenizer = models.load_tokenizer(str(other))
    tail = None if top_k == "vocab" else "sampled"  # k < |V|: read the draws too
    chosen = options(cache=str(cache), student=str(other), objective="delta", frozen_student=True,
                     tail=tail)  # fmt: skip
    training = loop.distill_data(chosen, tokenizer)
    assert training.needs_frozen_student and not training.use_cached_student
    assert not training.use_cached_tail_shift
    examples = all_examples(training.store)[:4]
    batch = batching.collate(examples, tokenizer.pad_token_id, False, False)
    cached, vocab = batch["cached"], training.vocab_size
    assert cached.target_tail_shift is None and cached.student_logprobs is None
    live = teacher_logprobs(other, batch, vocab)  # the live S0's log-probs
    tuned = teacher_logprobs(tiny.teacher_tuned, batch, vocab)
    base = teacher_logprobs(tiny.teacher_base, batch, vocab)
    delta = TargetSpec(((1.0, 1.0),), 1.0)
    bucket = build_view(cached, delta, tail_estimator("bucket"), training.facts, 1.0, live)
    if top_k == "vocab":
        exact = torch.log_softmax(live + tuned - base, dim=-1)
        torch.testing.assert_close(bucket.head, exact.gather(1, cached.ids), atol=2e-5, rtol=0)
        assert torch.isneginf(bucket.tail).all()  # no tail
        return
    shift = targets.teacher_tail_shift(cached, 1.0)
    full = targets.delta_target_full(live, cached, 1.0, shift)
    got = torch.cat([bucket.head, bucket.tail.unsqueeze(1)], dim=1)
    torch.testing.assert_close(got, targets.bucket_logprobs(full, cached.ids))
    # the draws (--tail sampled): log p* at K and at the drawn ids is the live S0's l0 + Delta
    # less one normaliser per position, estimated from the draws
    drawn = build_view(cached, delta, tail_estimator("sampled"), training.facts, 1.0, live)
    assert drawn.ess is not None  # self-normalised: no stored tail of the cache's student
    unnormalised = live + tuned - base
    head_offset = drawn.head - unnormalised.gather(1, cached.ids)
    used = cached.sample_counts > 0
    drawn_offset = drawn.drawn - unnormalised.gather(1, cached.sample_ids.long())
    log_norm = head_offset[:, :1]
    torch.testing.assert_close(head_offset, log_norm.expand_as(head_offset), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        drawn_offset[used], log_norm.expand_as(drawn_offset)[used], atol=1e-4, rtol=0
    )
    # the same cache with its own student keeps its mass-matched tail
    own = options(cache=str(cache), student=str(tiny.student), objective="delta",
                  frozen_student=True)  # fmt: skip
    assert loop.distill_data(own, models.load_tokenizer(str(tiny.student))).use_cached_tail_shift
