"""models.py: what a model spec means (local path or Hub id), the hidden -> logits step shared by
the cache and training (logit scaling and soft-capping included), the loading report, the
position limit."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import assert_one_line_error, cache_args, run_cli

from deltakd_cli import models
from deltakd_cli.cache.build import PositionLogprobs
from deltakd_cli.errors import DeltakdError
from deltakd_cli.train.objective import ObjectiveModule
from deltakd_cli.train.options import DistillOptions

VOCAB = 64


def scaled_model(kind: str):
    """A tiny model whose config post-processes its logits: Cohere's `logit_scale` or Gemma 2's
    `final_logit_softcapping` (output weights scaled up so that the cap really bites)."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if kind == "logit_scale":
        model = CohereForCausalLM(CohereConfig(logit_scale=0.25, **common))
    else:
        config = Gemma2Config(head_dim=8, final_logit_softcapping=3.0, **common)
        model = Gemma2ForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["logit_scale", "softcapping"])
def test_the_cache_and_training_see_the_models_own_logits(kind):
    model = scaled_model(kind)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = models.decoder_of(model)(input_ids=input_ids).last_hidden_state
        plain = model.get_output_embeddings()(hidden)
    assert not torch.allclose(plain, reference, atol=1e-3)  # the post-processing matters here
    flat = models.head_logits(model, hidden.reshape(-1, hidden.shape[-1]), VOCAB)
    torch.testing.assert_close(flat.reshape(reference.shape), reference)

    rows = torch.tensor([0, 0, 1, 1, 1])
    positions = torch.tensor([3, 4, 5, 6, 7])
    expected = torch.log_softmax(reference[rows, positions].float(), dim=-1)
    # the cache's path: decoder once, then the head at the target positions
    cache_path = PositionLogprobs(model, VOCAB)
    cache_path.check_against_forward(input_ids, attention_mask)  # refuses a mismatch
    states = cache_path.hidden(input_ids, attention_mask)[rows, positions]
    torch.testing.assert_close(cache_path.logprobs(states), expected)
    # the training path: the chunked objective's cross-entropy at the same positions
    options = DistillOptions(cache="-", student="-", out="-", objective="sft", logit_chunk_size=2)
    module = ObjectiveModule(model, options, VOCAB, torch.float32)
    labels = input_ids[rows, positions + 1]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "target_batch": rows,
        "target_pos": positions,
        "labels": labels,
        "cached": None,
    }
    with torch.no_grad():
        loss_sum = module(batch)[0]
    torch.testing.assert_close(loss_sum, -expected.gather(1, labels[:, None]).sum())


def test_decoder_layers_are_found_by_name(tiny):
    model = models.load_model(str(tiny.teacher_base))
    prefix, layers = models.decoder_layers(model)
    assert prefix == "model.layers." and len(layers) == model.config.num_hidden_layers
    assert models.decoder_of(model) is model.model


def test_the_cache_checks_its_logits_path_on_a_prefix_and_refuses_a_mismatch(monkeypatch):
    """The one-time check sees only CHECK_POSITIONS tokens of one row (never a whole row's
    [tokens x vocab] logits) and still refuses logits it does not reproduce."""
    from deltakd_cli.cache import build

    model = scaled_model("logit_scale")
    input_ids = torch.randint(3, VOCAB, (2, 60))
    mask = torch.ones_like(input_ids)
    monkeypatch.setattr(build, "CHECK_POSITIONS", 16)
    seen = []
    original = model.forward
    monkeypatch.setattr(
        model, "forward", lambda **kw: seen.append(kw["input_ids"].shape) or original(**kw)
    )
    build.PositionLogprobs(model, VOCAB).check_against_forward(input_ids, mask)
    assert seen == [torch.Size([1, 16])]

    def unscaled(model, hidden, vocab_size):  # forgets Cohere's logit_scale
        return model.get_output_embeddings()(hidden)[:, :vocab_size]

    monkeypatch.setattr(models, "head_logits", unscaled)
    with pytest.raises(DeltakdError, match="post-processed"):
        build.PositionLogprobs(model, VOCAB).check_against_forward(input_ids, mask)


@pytest.mark.parametrize(
    "spec, local",
    [
        ("./m", True),
        ("../m", True),
        ("/abs/m", True),
        ("~/m", True),
        ("file:///abs/m", True),
        ("weights.safetensors", True),
        ("org/name", False),
        ("name", False),
        ("a/b/c", True),  # hub ids are org/name
        ("org/na me", True),
    ],
)
def test_which_specs_are_local_paths(spec, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert models.looks_local(spec) is local


def test_a_spec_whose_first_folder_exists_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not models.looks_local("org/name")
    (tmp_path / "org").mkdir()
    assert models.looks_local("org/name")
    (tmp_path / "org" / "named").mkdir()
    with pytest.raises(DeltakdError, match=r"Hub is not asked.*did you mean org/named\?"):
        models.resolve_source("org/name")
    (tmp_path / "org" / "name").mkdir()
    with pytest.raises(DeltakdError, match="not a model directory"):
        models.resolve_source("org/name")


def test_hub_ids_pass_through_and_file_urls_are_local(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert models.resolve_source("Qwen/Qwen2.5-0.5B").path == "Qwen/Qwen2.5-0.5B"
    assert not models.resolve_source("Qwen/Qwen2.5-0.5B").is_local
    source = models.resolve_source(f"file://{tiny.student}")
    assert source.is_local and source.path == str(tiny.student)


def test_an_unreachable_hub_model_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DeltakdError, match="HF_HUB_OFFLINE is set"):
        models.load_tokenizer("no-such-org/no-such-model")


def test_max_length_defaults_to_the_models_limit(tiny):
    specs = {"--model": str(tiny.student)}  # 256 positions
    assert models.resolve_max_length(None, specs) == 256
    assert models.resolve_max_length(100, specs) == 100
    with pytest.raises(DeltakdError, match="longer than --model"):
        models.resolve_max_length(257, specs)


def test_a_tied_output_layer_is_not_missing(tiny, tmp_path):
    """The loading report counts what is really missing: a tied lm_head is not."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    tied = tmp_path / "tied"
    shutil.copytree(tiny.student, tied)
    config = AutoConfig.from_pretrained(tied)
    config.tie_word_embeddings = True
    config.save_pretrained(tied)
    state = load_file(tied / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tied / "model.safetensors", metadata={"format": "pt"})
    model = models.load_model(str(tied))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    config.tie_word_embeddings = False  # the same file untied: lm_head is missing
    config.save_pretrained(tied)
    with pytest.raises(DeltakdError, match=r"1 missing \(lm_head.weight\)"):
        models.load_model(str(tied))


def test_remote_code_is_refused_explicitly_so_no_prompt_appears(tiny, monkeypatch):
    """Issue 22: without --trust-remote-code deltakd passed nothing, and transformers asked on
    the terminal whether an `auto_map` model's code may run. Every load now says False."""
    from transformers import AutoConfig, AutoTokenizer

    seen = []
    for cls in (AutoConfig, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "absent"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    models.load_tokenizer(str(tiny.student))
    models.model_config(str(tiny.student))
    assert seen and all(value is False for value in seen), seen
    asked = models.LoadSettings(trust_remote_code=True).hub_kwargs(
        models.resolve_source(str(tiny.student))
    )
    assert asked["trust_remote_code"] is True


@pytest.fixture(scope="module")
def small_vocab_model(tiny, tmp_path_factory):
    """A model whose output layer (config vocab_size) is 8 rows below its tokenizer."""
    from conftest import build_model

    root = tmp_path_factory.mktemp("small-vocab")
    return build_model(root / "small", tiny.tokenizer, 2, 32, seed=4,
                       vocab_rows=tiny.vocab_size - 8)  # fmt: skip


@pytest.mark.parametrize("command", ["cache-teachers", "distill", "finetune", "eval",
                                     "init-student"])  # fmt: skip
def test_a_vocabulary_below_the_tokenizers_is_refused_by_every_command(
    tiny, small_vocab_model, tmp_path, command
):
    """Issue 22: a config vocab_size below the tokenizer's was an IndexError in eval."""
    small, rows = small_vocab_model, f"{tiny.vocab_size - 8} rows"
    args = {
        "cache-teachers": cache_args(tiny, tmp_path / "c", "--top-k", 4, student=False)
        + ["--student", small],
        "finetune": ["finetune", "--model", small, "--data", tiny.train, "--out", tmp_path / "f",
                     "--max-steps", 1, "--device", "cpu"],
        "eval": ["eval", "--model", small, "--data", tiny.test, "--limit", 2, "--device", "cpu",
                 "--max-new-tokens", 2, "--protocol", "greedy"],
        "init-student": ["init-student", "--student-from", small, "--out", tmp_path / "s",
                         "--layers", 1, "--device", "cpu"],
    }  # fmt: skip
    if command == "distill":
        cache = tmp_path / "cache"  # teachers only: any student may train on it
        assert run_cli(cache_args(tiny, cache, "--top-k", 4, student=False)).exit_code == 0
        args[command] = ["distill", "--cache", cache, "--student", small, "--out", tmp_path / "d",
                         "--max-steps", 1, "--device", "cpu", "--objective", "kd"]  # fmt: skip
    assert_one_line_error(run_cli(args[command]), "output layer has", rows)
