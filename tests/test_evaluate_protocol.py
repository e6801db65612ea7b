"""evaluate/protocol.py: the presets, the overrides and their checks."""

from __future__ import annotations

import pytest

from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate import protocol as protocols


def test_minillm_preset_is_the_published_protocol():
    protocol = protocols.make_protocol("minillm")
    assert protocol.is_published
    kwargs = protocol.generate_kwargs()
    assert kwargs["do_sample"] is True
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (1.0, 1.0, 0)
    assert kwargs["max_new_tokens"] == 256 and protocol.max_prompt_length == 256
    assert kwargs["repetition_penalty"] == 1.0  # a checkpoint's own setting cannot leak in
    assert protocol.seeds == (10, 20, 30, 40, 50)
    report = protocol.to_report()
    assert report["seeds"] == [10, 20, 30, 40, 50] and report["matches_published_protocol"]
    assert not protocols.make_protocol("minillm", max_new_tokens=64).is_published


def test_greedy_preset_and_bad_settings():
    greedy = protocols.make_protocol("greedy", max_new_tokens=16)
    assert greedy.seeds == (None,) and not greedy.generate_kwargs()["do_sample"]
    assert greedy.to_report()["seeds"] == [] and not greedy.is_published
    for kwargs, message in [
        ({"name": "beam"}, "unknown protocol"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be a positive integer"),
        ({"max_prompt_length": -3}, "--max-prompt-length must be a positive integer"),
        ({"batch_size": 0}, "--batch-size must be a positive integer"),
        ({"template": "vicuna"}, "unknown template"),
        ({"name": "greedy", "seeds": "1,2"}, "--seeds needs sampling"),
    ]:
        with pytest.raises(DeltakdError, match=message):
            protocols.make_protocol(**kwargs)


def test_parse_seeds():
    assert protocols.parse_seeds("10,20, 30") == (10, 20, 30)
    assert protocols.parse_seeds("0") == (0,)
    for bad in ["", "1,,2", "a,b", "1.5", "-1", "3,3", "10;20"]:
        with pytest.raises(DeltakdError, match="--seeds"):
            protocols.parse_seeds(bad)
