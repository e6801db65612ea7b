"""method/objectives.py: the registry is the one source of the objectives' choices, settings, flags,
resume checks and model card; an option the objective does not read is refused; and a new
objective (with a new setting) is one registration, trained by `distill` with nothing else
changed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO, assert_one_line_error, cache_args, run_cli

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method import objectives
from deltakd_cli.method.objectives import OBJECTIVES
from deltakd_cli.train import card
from deltakd_cli.train.options import (
    OPTIONS_THAT_MATTER,
    DistillOptions,
    FinetuneOptions,
    objective_settings,
)


def test_every_setting_is_a_distill_option_declared_once():
    fields = {f.name: f for f in dataclasses.fields(DistillOptions)}
    for name, declared in objectives.setting_fields().items():
        given, shown = dict(declared.metadata), dict(fields[name].metadata)
        readers = ", ".join(objectives.readers_of(name))
        assert shown.pop("help") == f"{given.pop('help')} Read by: {readers}."
        assert shown == given  # checks, panel: the declaration's own
        assert fields[name].default == declared.default
        assert name in OPTIONS_THAT_MATTER  # a resume compares it
        assert objectives.readers_of(name)  # some objective reads it
    assert set(objectives.setting_fields()) == {"alpha", "mix", "gamma", "beta", "skew"}


def test_each_objective_gets_exactly_its_own_settings():
    options = DistillOptions(cache="c", student="s", out="o", objective="kd-to-delta", gamma=0.25)
    settings = objective_settings(options)
    assert settings == objectives.FamilySettings(gamma=0.25, alpha=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.gamma = 0.5
    assert OBJECTIVES["gjsd"].reads == ("beta",) and OBJECTIVES["kd"].reads == ()
    # finetune reads no setting: its objective is sft
    finetune = FinetuneOptions(model="m", data="d", out="o")
    assert objective_settings(finetune) == objectives.NoSettings()
    assert objectives.setting_values(finetune) == objectives.setting_defaults()


@pytest.mark.parametrize(
    ("objective", "given", "words"),
    [
        ("delta", {"gamma": 0.0}, ("--objective delta does not read --gamma", "kd-to-delta")),
        ("kd", {"alpha": 2.0}, ("--objective kd does not read --alpha", "delta")),
        ("delta", {"beta": 0.2}, ("does not read --beta", "gjsd")),
        ("sft", {"mix": 0.1}, ("does not read --mix", "delta-mix")),
    ],
)
def test_a_setting_the_objective_does_not_read_is_refused(objective, given, words):
    entry = OBJECTIVES[objective]
    with pytest.raises(DeltakdError) as error:
        objectives.refuse_unread(entry, {**objectives.setting_defaults(), **given})
    for word in words:
        assert word in str(error.value)
    objectives.refuse_unread(entry, objectives.setting_defaults())  # defaults pass


def test_distill_refuses_gamma_for_delta_in_one_line(tiny, tmp_path):
    result = run_cli([
        "distill", "--cache", tmp_path / "no-cache", "--student", tiny.student,
        "--out", tmp_path / "out", "--objective", "delta", "--gamma", "0",
    ])  # fmt: skip
    assert_one_line_error(result, "--objective delta does not read --gamma", "kd-to-delta")
    assert not (tmp_path / "out").exists()


def test_the_model_card_records_every_setting_its_objective_reads():
    record = {
        "command": "distill",
        "options": {"objective": "kd-to-delta", "gamma": 0.25, "alpha": 2.0, "beta": 0.5,
                    "sft_weight": 0.0, "temperature": 1.0, "out": "m"},
    }  # fmt: skip
    text = card.model_card(record)
    assert "| gamma | 0.25 |" in text and "| alpha | 2.0 |" in text
    assert "| beta |" not in text  # kd-to-delta does not read it
    assert OBJECTIVES["kd-to-delta"].description in text
    assert "delta-kd" in text.split("---")[1]  # the registry's tags
    gjsd = card.model_card({"options": {**record["options"], "objective": "gjsd"}})
    assert "| beta | 0.5 |" in gjsd and "| gamma |" not in gjsd


def test_registering_twice_or_redeclaring_a_setting_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        objectives.register(OBJECTIVES["kd"])

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class OtherGamma:
        gamma: float = 0.5

    with pytest.raises(ValueError, match="declared twice"):
        objectives.register(objectives.Objective("other", "x", "x", OtherGamma, divergence=print))
    assert "other" not in OBJECTIVES


TOY = textwrap.dedent(
    '''
    """A toy objective registered from outside the package: a hinge on the KD divergence, with
    its own new setting. Nothing else of deltakd is changed."""
    import sys
    from dataclasses import dataclass

    from deltakd_cli.method import divergences, objectives
    from deltakd_cli.options import opt


    @dataclass(frozen=True, kw_only=True)
    class MarginSettings:
        margin: float = opt(0.0, help="toy: the KL below which a position costs nothing.",
                            at_least=0, panel=objectives.PANEL)


    def hinge_kd(view, student, settings):
        return (divergences.forward_kl(view, student) - settings.margin).clamp(min=0)


    objectives.register(objectives.Objective(
        "hinge-kd", "Hinge-KD student", "a hinge on token-level KD", MarginSettings,
        divergence=hinge_kd))

    from deltakd_cli.cli import main

    sys.argv = ["deltakd", *sys.argv[1:]]
    main()
    '''
)


@pytest.mark.slow
def test_a_new_objective_with_a_new_setting_is_one_registration(tiny, tmp_path):
    cache = tmp_path / "cache"
    assert run_cli(cache_args(tiny, cache, "--top-k", 8)).exit_code == 0
    script = tmp_path / "toy.py"
    script.write_text(TOY)

    def deltakd(*args):
        return subprocess.run(
            [sys.executable, str(script), *map(str, args)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    shown = deltakd("distill", "--help")
    assert shown.returncode == 0 and "--margin" in shown.stdout and "hinge-kd" in shown.stdout
    out = tmp_path / "student"
    trained = deltakd(
        "distill", "--cache", cache, "--student", tiny.student, "--out", out,
        "--objective", "hinge-kd", "--margin", "0.05", "--max-steps", 3, "--device", "cpu",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["objective"] == "hinge-kd" and run["options"]["margin"] == 0.05
    assert run["final_metrics"]["steps"] == 3
    assert "| margin | 0.05 |" in (out / "README.md").read_text()
    # the new setting is refused for an objective that does not read it
    refused = deltakd(
        "distill", "--cache", cache, "--student", tiny.student, "--out", tmp_path / "other",
        "--objective", "kd", "--margin", "0.05",
    )  # fmt: skip
    assert refused.returncode == 2 and "does not read --margin (read by: hinge-kd)" in (
        refused.stdout + refused.stderr
    )
