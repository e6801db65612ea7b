"""The sampled tail (method/sampling.py, the view's drawn target, the losses on it): the draws,
their unbiasedness against dense full-vocabulary references, the self-normalised bias's 1/M
decay, the cache format 5 end to end, and TRL's loss at k = |V|."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, cache_args, run_cli
from objective_calls import delta_loss, divergence, kd_loss

from deltakd_cli.cache import manifest as cache_manifest
from deltakd_cli.cache import schema
from deltakd_cli.cache.manifest import manifest_checksum
from deltakd_cli.cache.reader import CacheReader
from deltakd_cli.method import sampling
from deltakd_cli.method.objectives import OBJECTIVES
from deltakd_cli.method.spec import CacheFacts, TargetSpec, tail_estimator
from deltakd_cli.method.targets import (
    TailDraws,
    build_cached_targets,
    exact_delta_target,
    tail_shift,
)
from deltakd_cli.method.view import build_view
from deltakd_cli.train.batching import collate

# ----------------------------------------------------------------------------- the draws


def test_uniforms_are_keyed_by_their_counters_alone():
    whole = sampling.counter_uniforms(7, np.arange(6), np.arange(6) * 3, 5)
    part = sampling.counter_uniforms(7, np.arange(2, 4), np.arange(2, 4) * 3, 5)
    np.testing.assert_array_equal(whole[2:4], part)  # a subset of positions draws the same
    assert not np.array_equal(
        whole, sampling.counter_uniforms(8, np.arange(6), np.arange(6) * 3, 5)
    )
    assert ((whole >= 0) & (whole < 1)).all()
    # uniform: the mean and variance of 200,000 draws are 1/2 and 1/12 within 5 standard errors
    many = sampling.counter_uniforms(0, np.arange(2000), np.zeros(2000), 100).ravel()
    assert abs(many.mean() - 0.5) < 5 * np.sqrt(1 / 12 / many.size)
    assert abs(many.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / many.size)


def test_draws_follow_the_proposal_with_replacement_and_never_hit_the_head():
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(1, 30), dim=-1)
    ids = torch.tensor([[0, 5, 9]])
    proposal = sampling.tail_proposal_logprobs(logprobs, ids)
    rows = 4000
    drawn = sampling.draw_from_tail(
        proposal.expand(rows, -1),
        torch.from_numpy(sampling.counter_uniforms(3, np.arange(rows), np.zeros(rows), 25)),
    )
    assert not torch.isin(drawn, ids).any()
    frequency = torch.bincount(drawn.ravel(), minlength=30).double() / drawn.numel()
    q = proposal.exp()[0]
    standard_error = (q * (1 - q) / drawn.numel()).sqrt()
    assert ((frequency - q).abs() <= 5 * standard_error + 1e-12).all()


def test_unique_ids_and_counts():
    drawn = torch.tensor([[5, 3, 5, 9, 3, 3], [-1, -1, -1, -1, -1, -1], [2, 2, 2, 2, 2, 2]])
    ids, counts = sampling.unique_with_counts(drawn)
    assert ids.tolist() == [[3, 5, 9, 9, 9, 9], [0] * 6, [2] * 6]
    assert counts.tolist() == [[3, 2, 1, 0, 0, 0], [0] * 6, [6, 0, 0, 0, 0, 0]]


# ----------------------------------------------------------------------------- unbiasedness


def replicated(vocab: int = 24, rows: int = 4000, seed: int = 0):
    """One position's full distributions, replicated over `rows` positions whose draws are
    independent (each row is its own example index)."""
    generator = torch.Generator().manual_seed(seed)
    tuned, base, student = (
        torch.log_softmax(2 * torch.randn(1, vocab, generator=generator, dtype=torch.float64), -1)
        for _ in range(3)
    )
    theta = torch.randn(1, vocab, generator=generator, dtype=torch.float64)
    return tuple(t.expand(rows, -1).clone() for t in (tuned, base, student, theta))


def sampled_cache(tuned, base, student, k, samples, alpha=1.0, seed=0):
    rows = tuned.shape[0]
    draws = TailDraws(samples, seed, torch.arange(rows), torch.zeros(rows, dtype=torch.long))
    if student is None:  # a teacher-only cache: the tuned teacher's top-k, the teachers' tail
        return build_cached_targets(tuned.float(), base.float(), None, k, "tuned", alpha,
                                    "teacher", draws=draws)  # fmt: skip
    return build_cached_targets(
        tuned.float(), base.float(), student.float(), k, "target", alpha, "mass-matched",
        draws=draws,
    )  # fmt: skip


def drawn_target(cached, gamma: float, alpha: float, cache_alpha: float | None):
    """The sampled tail's view of the family point (gamma, alpha): K, then the drawn ids."""
    spec = TargetSpec(((1.0, gamma),), alpha)
    return build_view(cached, spec, tail_estimator("sampled"), CacheFacts(alpha=cache_alpha))


def estimated_mass(view) -> torch.Tensor:
    """sum over K of r + sum over the draws of w_j r_j per position: the target's estimated
    total mass."""
    return view.head.exp().sum(1) + (view.drawn + view.drawn_log_weights).exp().sum(1)


def per_row_gradients(loss_of, theta: torch.Tensor) -> torch.Tensor:
    """d loss_i / d logits_i for every row i (rows are independent)."""
    logits = theta.float().clone().requires_grad_(True)
    loss_of(logits).sum().backward()
    return logits.grad.double()


def assert_unbiased(gradients: torch.Tensor, dense: torch.Tensor) -> None:
    """The mean over rows equals the dense gradient within 5 standard errors of the mean (from
    the measured spread), per vocabulary entry, plus float32 rounding."""
    mean = gradients.mean(dim=0)
    standard_error = gradients.std(dim=0) / gradients.shape[0] ** 0.5
    assert ((mean - dense).abs() <= 5 * standard_error + 2e-4).all(), (mean - dense).abs().max()
    # and the estimate is noisy at all (a check that could not fail would pass a biased zero)
    assert standard_error.max() > 0


def test_kd_gradient_from_the_sampled_tail_is_unbiased():
    tuned, base, student, theta = replicated()
    cached = sampled_cache(tuned, base, None, 4, 6)
    gradients = per_row_gradients(lambda z: kd_loss(z, cached, tail="sampled"), theta)
    dense = (torch.softmax(theta[0], -1) - tuned[0].exp()).double()
    assert_unbiased(gradients, dense)
    # the bucket cache of the same head is biased: its tail gradient has the student's shape
    bucket = build_cached_targets(tuned.float(), base.float(), None, 4, "tuned", 1.0, "teacher")
    biased = per_row_gradients(lambda z: kd_loss(z, bucket, tail="bucket"), theta)
    assert (biased.mean(0) - dense).abs().max() > 10 * (gradients.mean(0) - dense).abs().max()


def test_delta_gradient_at_the_cache_alpha_is_unbiased_with_plain_weights():
    tuned, base, student, theta = replicated(seed=1)
    cached = sampled_cache(tuned, base, student, 4, 6, alpha=1.0)
    gradients = per_row_gradients(
        lambda z: delta_loss(z, cached, 1.0, cache_alpha=1.0, tail="sampled"), theta
    )
    dense_target = exact_delta_target(student[0:1], tuned[0:1], base[0:1], 1.0)[0].exp()
    assert_unbiased(gradients, torch.softmax(theta[0], -1) - dense_target)
    # plain weights: the estimated target's mass is not forced to 1 at a single position
    view = drawn_target(cached, 1.0, 1.0, 1.0)
    assert view.ess is None
    mass = estimated_mass(view)
    assert mass.std() > 1e-3 and abs(mass.mean() - 1) < 5 * mass.std() / len(mass) ** 0.5


def test_kd_value_is_an_unbiased_kl_estimate():
    tuned, base, student, theta = replicated(seed=2)
    cached = sampled_cache(tuned, base, None, 3, 5)
    values = kd_loss(theta.float(), cached, tail="sampled").double()
    dense = (tuned[0].exp() * (tuned[0] - torch.log_softmax(theta[0], -1))).sum()
    assert abs(values.mean() - dense) < 5 * values.std() / len(values) ** 0.5 + 1e-4


def test_self_normalised_bias_shrinks_about_4x_from_m_to_4m():
    """Delta off the cache's alpha has no known normaliser: the weights are self-normalised,
    biased O(1/M). Measured with 60,000 independent rows of one position (k = 1, alpha 2 on a
    cache made at alpha 1): the bias at M and 4M each stands well above the mean's noise."""
    tuned, base, student, theta = replicated(rows=60000, seed=6)
    dense_target = exact_delta_target(student[0:1], tuned[0:1], base[0:1], 2.0)[0].exp()
    dense = torch.softmax(theta[0], -1) - dense_target
    bias = {}
    for samples in (4, 16):
        cached = sampled_cache(tuned, base, student, 1, samples, alpha=1.0)
        ess = drawn_target(cached, 1.0, 2.0, 1.0).ess
        assert ess is not None and (ess <= samples + 1e-4).all()  # logged: self-normalised
        gradients = per_row_gradients(
            lambda z, c=cached: delta_loss(z, c, 2.0, cache_alpha=1.0, tail="sampled"), theta
        )
        error = gradients.mean(0) - dense
        noise = (gradients.std(0) / len(gradients) ** 0.5).norm()
        bias[samples] = error.norm()
        assert bias[samples] > 5 * noise, (samples, bias[samples], noise)  # bias, not noise
    assert 3 < bias[4] / bias[16] < 6, bias


def test_kd_sampled_target_sums_to_one_with_the_tuned_proposal():
    tuned, base, student, _ = replicated(rows=50, seed=4)
    cached = sampled_cache(tuned, base, None, 4, 8)
    cached.tuned_logprobs = cached.tuned_logprobs.half().float()  # as stored in float16
    mass = estimated_mass(drawn_target(cached, 0.0, 1.0, None))
    torch.testing.assert_close(mass, torch.ones(50), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def drawn_cache(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("drawn") / "cache"
    result = run_cli(cache_args(tiny, out, "--top-k", 8, "--tail-samples", 12, "--batch-size", 3))
    assert result.exit_code == 0, result.output
    return out


def test_format_5_cache_holds_the_draws(drawn_cache, tiny):
    reader = CacheReader(str(drawn_cache))
    reader.check_structure()
    assert reader.verify() == []
    manifest = reader.manifest
    assert manifest["format_version"] == 6 and manifest["tail_samples"] == 12
    assert manifest["proposal"] == "tuned+target" and manifest["sample_seed"] == 0
    example = reader.read_examples(0, 0, 1)[0].targets
    assert (example.sample_counts.sum(axis=1) == 12).all()
    for row in range(len(example.ids)):
        used = example.sample_counts[row] > 0
        drawn = example.sample_ids[row][used]
        assert (np.diff(drawn) > 0).all()  # distinct, ascending
        assert not np.isin(drawn, example.ids[row]).any()  # never in the head


def test_resume_with_another_draw_seed_is_refused(drawn_cache, tiny, tmp_path):
    args = cache_args(tiny, drawn_cache, "--top-k", 8, "--tail-samples", 12, "--batch-size", 3,
                      "--sample-seed", 5)  # fmt: skip
    assert_one_line_error(run_cli(args), "other settings", "sample_seed")


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--tail-samples", -1], ["--tail-samples"]),
        (["--tail-samples", 4, "--top-k", 10**6], ["--top-k"]),
    ],
)
def test_bad_sampling_options_get_one_line(tiny, tmp_path, extra, fragments):
    assert_one_line_error(run_cli(cache_args(tiny, tmp_path / "c", *extra)), *fragments)


def test_samples_with_the_whole_vocabulary_kept_are_refused(tiny, tmp_path):
    args = cache_args(tiny, tmp_path / "c", "--top-k", tiny.vocab_size, "--tail-samples", 4)
    assert_one_line_error(run_cli(args), "--tail-samples", "whole vocabulary")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_distill_refuses_another_temperature(drawn_cache, tiny, tmp_path):
    args = ["distill", "--cache", drawn_cache, "--student", tiny.student, "--objective", "kd",
            "--out", tmp_path / "run", "--temperature", 2, "--device", "cpu"]  # fmt: skip
    assert_one_line_error(run_cli(args), "cache drawn at temperature 1")


def test_an_older_reader_refuses_a_newer_format_in_one_line(drawn_cache, monkeypatch):
    monkeypatch.setattr(cache_manifest, "READABLE_FORMAT_VERSIONS", (3, 4, 5))
    with pytest.raises(Exception) as raised:
        CacheReader(str(drawn_cache))
    assert "cache format 6 is not supported" in str(raised.value)
    assert "\n" not in str(raised.value)


def distill_args(cache, tiny, out, *extra):
    return ["distill", "--cache", cache, "--student", tiny.student, "--out", out,
            "--max-steps", 3, "--batch-size", 4, "--device", "cpu", "--num-workers", 0,
            *extra]  # fmt: skip


@pytest.mark.parametrize("objective", ["kd", "delta", "kd-to-delta", "delta-mix"])
def test_every_distribution_objective_trains_on_every_tail(drawn_cache, tiny, tmp_path, objective):
    """On a cache with draws: the objective's default tail (its registered, measured one), then
    each tail by --tail, every one recorded as the tail the run trained."""
    for tail in (None, "bucket", "sampled", "corrected"):
        out = tmp_path / f"{objective}-{tail}"
        extra = [] if tail is None else ["--tail", tail]
        result = run_cli(distill_args(drawn_cache, tiny, out, "--objective", objective, *extra))
        assert result.exit_code == 0, result.output
        run = json.loads((out / "run.json").read_text())
        assert run["resolved"]["tail"] == (tail or OBJECTIVES[objective].default_tail)
        assert np.isfinite(run["final_metrics"]["final_distill"])


def test_a_format_4_cache_still_trains(tiny, tmp_path):
    """A format-4 cache: the same arrays, a manifest without the format-5 keys, naming the kept-id
    count k and repeating settings.json (as formats 3 to 5 did)."""
    out = tmp_path / "old"
    assert run_cli(cache_args(tiny, out, "--top-k", 8, "--tail-samples", 0)).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("tail_samples", "sample_seed", "proposal", "temperature"):
        manifest.pop(key)
    manifest["k"] = manifest.pop("top_k")
    manifest["settings"] = json.loads((out / "settings.json").read_text())["settings"]
    manifest["format_version"] = 4
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert CacheReader(str(out)).tail_samples == 0 and CacheReader(str(out)).top_k == 8
    result = run_cli(distill_args(out, tiny, tmp_path / "run", "--objective", "delta"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resolved"]["tail"] == "bucket"


# ----------------------------------------------------------------------------- TRL's loss


def test_kd_from_a_full_vocabulary_cache_equals_trl_generalized_jsd(tiny, tmp_path):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="the bench extra has trl")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    args = cache_args(tiny, out, "--top-k", tiny.vocab_size, "--precision", "float32",
                      "--batch-size", 4, student=False)  # fmt: skip
    args[args.index("--teacher-base") + 1] = str(tiny.teacher_tuned)
    assert run_cli(args).exit_code == 0
    reader = CacheReader(str(out))
    batch = collate(reader.read_examples(0, 0, 4), pad_id=0)
    teacher, student = (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for path in (tiny.teacher_tuned, tiny.student)
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    student_logits = student(**inputs).logits
    rows, positions = batch["target_batch"], batch["target_pos"]
    vocab = reader.vocab_size

    ours_logits = student_logits[rows, positions, :vocab]
    ours = kd_loss(ours_logits, batch["cached"], tail="bucket").sum() / len(rows)
    labels = torch.full(student_logits.shape[:2], -100)
    labels[rows, positions] = 1
    theirs = gkd.GKDTrainer.generalized_jsd_loss(
        student_logits[..., :vocab], teacher_logits[..., :vocab], labels, beta=0.0
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours_grad = torch.autograd.grad(ours, student_logits, retain_graph=True)[0]
    theirs_grad = torch.autograd.grad(theirs, student_logits)[0]
    torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-5, rtol=1e-4)


def test_schema_counts_fit_the_draws():
    assert schema.counts_dtype(255) == "uint8" and schema.counts_dtype(256) == "uint16"


def test_tail_shift_is_unchanged_by_samples():
    tuned, base, student, _ = replicated(rows=4, seed=5)
    cached = sampled_cache(tuned, base, student, 4, 4)
    plain = build_cached_targets(tuned.float(), base.float(), student.float(), 4, "target", 1.0,
                                 "mass-matched")  # fmt: skip
    torch.testing.assert_close(tail_shift(cached, 1.0, 1.0), tail_shift(plain, 1.0, 1.0))


def test_a_self_normalised_target_is_said_with_its_effective_sample_size(drawn_cache, tiny,
                                                                          tmp_path):  # fmt: skip
    def delta_run(tail, *extra):
        out = tmp_path / f"{tail}{'-'.join(map(str, extra))}"
        result = run_cli(distill_args(drawn_cache, tiny, out, "--objective", "delta",
                                      "--tail", tail, *extra))  # fmt: skip
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    for tail in ("sampled", "corrected"):  # the tails that read the draws
        text = delta_run(tail, "--alpha", 2)  # off the cache's alpha: no known normaliser
        assert "self-normalised" in text and "effective sample size" in text
        assert "self-normalised" not in delta_run(tail)  # the cache's alpha: exact
    assert "self-normalised" not in delta_run("bucket", "--alpha", 2)  # no draws read


def test_inspect_shows_the_draws_with_their_token_text(drawn_cache):
    result = run_cli(["inspect", drawn_cache, "--example", 0, "--positions", 2, "--json"])
    assert result.exit_code == 0, result.output
    decoded = json.loads(result.output)
    vocabulary = CacheReader(str(drawn_cache)).vocabulary()
    for entry in decoded["positions"]:
        assert sum(d["count"] for d in entry["draws"]) == 12
        for draw in entry["draws"]:
            assert draw["text"] == vocabulary[draw["id"]] and draw["count"] > 0
    table = run_cli(["inspect", drawn_cache, "--example", 0, "--positions", 2])
    assert "drawn tail ids" in table.output
    summary = json.loads(run_cli(["inspect", drawn_cache, "--json"]).output)
    assert summary["tail_samples"] == 12 and summary["proposal"] == "tuned+target"


@pytest.mark.parametrize(
    ("name", "settings"),
    [("reverse-kl", {}), ("gjsd", {"beta": 0.5}), ("skew-kl", {"skew": 0.1}), ("tv", {})],
)
def test_new_divergences_on_the_sampled_tail_are_unbiased(name, settings):
    """Each new objective's value and gradient from K + the drawn ids, weighted, average to the
    dense full-vocabulary ones (a sum of per-token terms, estimated term by term)."""
    tuned, base, student, theta = replicated(seed=11)
    cached = sampled_cache(tuned, base, None, 4, 6)
    assert OBJECTIVES[name].reads == tuple(settings)

    def loss(z):
        return divergence(name, z, cached, tail="sampled", **settings)

    def dense(z):  # the same objective with every id kept
        full = build_cached_targets(tuned[:1].float(), base[:1].float(), None, tuned.shape[1],
                                    "tuned", 1.0, "teacher")  # fmt: skip
        return divergence(name, z, full, tail="bucket", **settings)

    gradients = per_row_gradients(loss, theta)
    assert_unbiased(gradients, per_row_gradients(dense, theta[:1])[0])
    estimates = loss(theta.float()).double().detach()
    want = dense(theta[:1].float()).double().detach()[0]
    assert abs(estimates.mean() - want) < 5 * estimates.std() / len(estimates) ** 0.5 + 1e-4
