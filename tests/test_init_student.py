"""`deltakd init-student`: layer choice, the pruned copy against an independent module surgery,
healing (the healed copy is closer to its source than the pruned one), reruns, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model
from helpers import assert_one_line_error, run_cli

from deltakd_cli import models
from deltakd_cli.errors import DeltakdError
from deltakd_cli.init_student import layers, prune, run
from deltakd_cli.init_student.options import InitStudentOptions

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- choosing layers


def test_uniform_layers_span_first_to_last():
    assert layers.choose_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert layers.choose_layers(4, 2) == [0, 3]
    assert layers.choose_layers(5, 5) == [0, 1, 2, 3, 4]
    assert layers.choose_layers(7, 1) == [6]
    for total in range(1, 40):
        for keep in range(1, total + 1):
            chosen = layers.choose_layers(total, keep)
            assert len(chosen) == keep and chosen == sorted(set(chosen))
            assert 0 <= chosen[0] and chosen[-1] == total - 1


def test_block_influence_keeps_the_layers_that_change_their_input_most():
    scores = [0.9, 0.1, 0.05, 0.3, 0.02, 0.8]
    assert layers.choose_layers(6, 3, "block-influence", scores) == [0, 3, 5]
    with pytest.raises(DeltakdError, match="one score per source layer"):
        layers.choose_layers(6, 3, "block-influence", scores[:4])
    assert layers.resolve_rule("auto", have_text=True) == "block-influence"
    assert layers.resolve_rule("auto", have_text=False) == "uniform"
    with pytest.raises(DeltakdError, match="needs text"):
        layers.resolve_rule("block-influence", have_text=False)


def test_block_influence_matches_hidden_states_from_the_forward(tiny, tmp_path):
    """Hooks on the layers against an independent reference: the model's own hidden states
    (hidden_states[i] enters layer i; the last entry is after the final norm, so the last layer
    is checked only through the hooks' shape)."""
    source = tmp_path / "four"
    build_model(source, tiny.tokenizer, layers=4, hidden=32, seed=7)
    model = models.load_model(str(source))
    sequences = [[5, 17, 40, 8, 99, 3], [11, 12, 13]]
    scores = layers.block_influence(model, sequences)
    assert len(scores) == 4
    expected = torch.zeros(3)
    with torch.no_grad():
        for ids in sequences:
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for index in range(3):
                cosine = torch.nn.functional.cosine_similarity(
                    hidden[index][0], hidden[index + 1][0], dim=-1
                )
                expected[index] += (1 - cosine.mean()) / len(sequences)
    torch.testing.assert_close(torch.tensor(scores[:3], dtype=torch.float32), expected)


def test_layer_lists_parse_and_refuse_nonsense():
    assert layers.parse_layers("0,3,6-9,29", 30) == [0, 3, 6, 7, 8, 9, 29]
    assert layers.parse_layers("5,1", 6) == [1, 5]
    for text, fragment in (("1,1", "twice"), ("0,30", "outside"), ("a", "not a layer")):
        with pytest.raises(DeltakdError, match=fragment):
            layers.parse_layers(text, 30)
    with pytest.raises(DeltakdError, match="between 1 and 4"):
        layers.choose_layers(4, 5)


# ----------------------------------------------------------------------------- pruning


def surgery_reference(source: Path, keep: list[int]):
    """Independent reference: the source model with its layer list cut in place."""
    model = models.load_model(str(source))
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(keep)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_pruned_copy_equals_the_source_with_layers_cut(tiny, tmp_path, tied):
    source = tmp_path / "source"
    build_model(source, tiny.tokenizer, layers=4, hidden=32, seed=5)
    if tied:  # tied embeddings (SmolLM2 has them): rebuild with tie_word_embeddings
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source)
        config.tie_word_embeddings = True
        torch.manual_seed(5)
        AutoModelForCausalLM.from_config(config).save_pretrained(source)
    keep = [0, 3]
    out = prune.prune(str(source), keep, tmp_path / "pruned")
    pruned = models.load_model(str(out))
    assert pruned.config.num_hidden_layers == 2
    reference = surgery_reference(source, keep)
    ids = torch.randint(0, tiny.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
        # and generation with a KV cache works (layer indices were renumbered)
        pruned.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    if tied:
        head, embed = pruned.get_output_embeddings(), pruned.get_input_embeddings()
        assert head.weight.data_ptr() == embed.weight.data_ptr()


def test_keeping_every_layer_reproduces_the_source(tiny, tmp_path):
    out = prune.prune(str(tiny.teacher_base), [0, 1], tmp_path / "all")
    ids = torch.randint(0, tiny.vocab_size, (1, 10))
    with torch.no_grad():
        same = models.load_model(str(out))(ids).logits
        source = models.load_model(str(tiny.teacher_base))(ids).logits
    torch.testing.assert_close(same, source, rtol=0, atol=0)


def test_per_layer_config_lists_follow_the_kept_layers():
    from transformers import Qwen2Config

    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Qwen2Config(num_hidden_layers=4, layer_types=types, use_sliding_window=True)
    pruned = prune.pruned_config(config, [1, 2])
    assert pruned.num_hidden_layers == 2
    assert pruned.layer_types == ["sliding_attention", "full_attention"]
    assert config.num_hidden_layers == 4  # the source config is not touched


# ----------------------------------------------------------------------------- healing text


def test_heal_rows_from_text_txt_and_task_files(tmp_path):
    def options(heal_data, **extra):
        return InitStudentOptions(source="s", out=str(tmp_path / "o"), heal_data=str(heal_data),
                                  **extra)  # fmt: skip

    text = tmp_path / "docs.jsonl"
    text.write_text(
        json.dumps({"text": "one two three four five six"}) + "\n"
        + json.dumps({"text": "short"}) + "\n"
    )  # fmt: skip
    # text rows are used as they are: every token is a target (language-model loss)
    assert run.heal_rows(options(text), tmp_path / "w") == (str(text), "plain")

    plain = tmp_path / "docs.txt"
    plain.write_text("a b c d e f\n\nalpha beta gamma delta epsilon\n")
    path, template = run.heal_rows(options(plain), tmp_path / "w")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert template == "plain"
    assert rows == [{"id": "0", "text": "a b c d e f"},
                    {"id": "2", "text": "alpha beta gamma delta epsilon"}]  # fmt: skip

    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    assert run.heal_rows(options(task), tmp_path / "w") == (str(task), "alpaca")

    named = tmp_path / "named.jsonl"
    named.write_text(json.dumps({"body": "some document text"}) + "\n")
    assert run.heal_rows(options(named, text_field="body"), tmp_path / "w")[1] == "plain"

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "a b c d e"}) + "\n{oops\n")
    with pytest.raises(DeltakdError, match="broken.jsonl:2"):
        run.heal_rows(options(broken), tmp_path / "w")


# ----------------------------------------------------------------------------- the command


def source_kl(source: Path, candidate: Path, texts: list[str]) -> float:
    """Mean KL(source || candidate) per token over `texts` (full vocabulary)."""
    tokenizer = models.load_tokenizer(str(source))
    teacher, other = models.load_model(str(source)), models.load_model(str(candidate))
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            p = torch.log_softmax(teacher(ids).logits[0], -1)
            q = torch.log_softmax(other(ids).logits[0], -1)
            total += float((p.exp() * (p - q)).sum())
            count += ids.shape[1]
    return total / count


@pytest.mark.slow
def test_init_student_prunes_heals_and_reuses(tiny, tmp_path):
    heal = tmp_path / "heal.jsonl"
    rows = [json.loads(line) for line in Path(tiny.train).read_text().splitlines()]
    heal.write_text(
        "".join(json.dumps({"text": f"{r['prompt']} {r['response']}"}) + "\n" for r in rows)
    )
    out = tmp_path / "s0"
    args = [
        "init-student",
        "--student-from", tiny.teacher_base,
        "--out", out,
        "--layers", 1,
        "--heal-data", heal,
        "--heal-epochs", 4,
        "--batch-size", 4,
        "--lr", 3e-3,
        "--top-k", 64,
        "--device", "cpu",
    ]  # fmt: skip
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "init-student.json").read_text())
    assert record["healed"] and record["layer_rule"] == "block-influence"
    assert len(record["layer_scores"]) == 2
    best = max(range(2), key=lambda i: record["layer_scores"][i])
    assert record["kept_layers"] == [best]
    assert record["heal"]["response_tokens"] > 0
    healed = models.load_model(str(out))
    assert healed.config.num_hidden_layers == 1

    # healing moved the copy towards its source on text it did not train on
    held_out = [
        r["prompt"] + " " + r["response"]
        for r in map(json.loads, Path(tiny.test).read_text().splitlines())
    ]
    pruned = Path(record["pruned_copy"])
    assert source_kl(tiny.teacher_base, out, held_out) < 0.9 * source_kl(
        tiny.teacher_base, pruned, held_out
    )

    # the same command again: nothing to do
    again = run_cli(args)
    assert again.exit_code == 0 and "already complete" in " ".join(again.output.split())
    # other settings refuse to replace it without --overwrite
    changed = run_cli([*args[:-2], "--seed", 1, "--device", "cpu"])
    assert_one_line_error(changed, "other settings", "--overwrite")
    # with --overwrite, a healing text cut at another length rebuilds the healing cache
    shorter = run_cli([*args, "--max-length", 24, "--overwrite"])
    assert shorter.exit_code == 0, shorter.output
    heal_cache = Path(record["pruned_copy"]).parent / "heal-cache" / "manifest.json"
    assert json.loads(heal_cache.read_text())["provenance"]["max_length"] == 24


def test_init_student_without_heal_data_copies_and_warns(tiny, tmp_path):
    result = run_cli(
        [
            "init-student",
            "--source",
            tiny.teacher_base,
            "--out",
            tmp_path / "s",
            "--keep-layers",
            "0",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "not healed" in " ".join(result.output.split())
    assert json.loads((tmp_path / "s" / "init-student.json").read_text())["healed"] is False


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--layers", 1, "--keep-layers", "0"], ["either --layers or --keep-layers"]),
        (["--layers", 0], ["--layers must be at least 1"]),
        (["--layers", 5], ["--layers must be between 1 and 2"]),
        (["--keep-layers", "0,7"], ["outside 0..1"]),
        (["--heal-data", "/nonexistent/heal.jsonl"], ["--heal-data not found"]),
    ],
)
def test_init_student_bad_inputs(tiny, tmp_path, extra, fragments):
    result = run_cli(
        ["init-student", "--student-from", tiny.teacher_base, "--out", tmp_path / "s", *extra]
    )
    assert_one_line_error(result, *fragments)


def test_init_student_missing_source(tmp_path):
    result = run_cli(["init-student", "--student-from", tmp_path / "nope", "--out", tmp_path / "s"])
    assert_one_line_error(result, "model not found")
