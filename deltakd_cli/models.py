"""Loading models and tokenizers (HF dirs, hub ids, GGUF files), dtype/device choice,
vocabulary compatibility, and fingerprints for provenance."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltakd_cli import vocab
from deltakd_cli.errors import DeltakdError, one_line
from deltakd_cli.option_groups import DTYPES, HUB_ID, LoadSettings
from deltakd_cli.outputs import check_finished_model, local_path

DEFAULT_LOAD = LoadSettings()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `path` is a local dir or hub id; `gguf_file` names a GGUF in it."""

    spec: str
    path: str
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).exists()


def looks_local(spec: str) -> bool:
    """Whether a model spec names a local path: it exists, is written like a path (./, ../,
    /, ~, file://, a weights file), or its first folder exists here (`m/teacher-tuend` with
    ./m present is a mistyped local path, never a Hub repository)."""
    if spec.startswith(("./", "../", "/", "~", "file://")) or spec in (".", ".."):
        return True
    path = Path(local_path(spec))
    if path.exists() or path.suffix in WEIGHT_SUFFIXES:
        return True
    if len(path.parts) > 1 and Path(path.parts[0]).exists():
        return True
    return not HUB_ID.match(spec)


def _not_found(spec: str) -> DeltakdError:
    path = Path(local_path(spec))
    if path.is_symlink() and not path.exists():
        return DeltakdError(f"model {spec} is a broken symlink (to {os.readlink(path)})")
    parent = path.parent if str(path.parent) else Path(".")
    hint = ""
    if parent.is_dir():
        others = [p.name for p in parent.iterdir() if p.name != path.name]
        close = difflib.get_close_matches(path.name, others, n=1)
        if close:
            hint = f"; did you mean {parent / close[0]}?"
    return DeltakdError(
        f"model not found: {spec} (a local path, so the Hugging Face Hub is not asked){hint}"
    )


def resolve_source(spec: str) -> ModelSource:
    """A model spec -> ModelSource. A local path must exist; a Hub id (`org/name`) is used as
    such only when nothing local matches it (see `looks_local`)."""
    path = Path(local_path(spec))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        check_finished_model(path, spec)  # never the weights of a run that did not finish
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec, str(path), ggufs[0].name)
            raise DeltakdError(f"{spec}: not a model directory (no config.json)")
        return ModelSource(spec, str(path))
    if path.is_file():
        raise DeltakdError(f"{spec}: a file, not a model directory or a .gguf file")
    if looks_local(spec):
        raise _not_found(spec)
    return ModelSource(spec, spec)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it, else float32."""
    if name not in DTYPES:
        raise DeltakdError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeltakdError(f"device {device} requested but CUDA is not available")


def _hub_error(source: ModelSource, error: Exception) -> DeltakdError:
    first = one_line(error)
    if source.is_local:
        return DeltakdError(f"cannot load model '{source.spec}': {first}")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        where = (
            "HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched and it is "
            "not there"
        )
    else:
        where = "the Hugging Face Hub could not provide it (no network, or no such repository)"
    return DeltakdError(
        f"cannot load model '{source.spec}': it is not a local path, so it names a Hub "
        f"repository; {where}. Download it first, or give a local directory ({first})"
    )


def quiet_transformers() -> None:
    """transformers' own progress bars and advice would interleave with deltakd's display."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(spec: str, settings: LoadSettings = DEFAULT_LOAD) -> Any:
    """The tokenizer of a model; a missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    quiet_transformers()
    source = resolve_source(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    kwargs.update(settings.hub_kwargs(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except Exception as error:  # transformers raises OSError/ValueError/etc. for bad sources
        raise _hub_error(source, error) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    device_map: str | dict[str, str] | None = None,
    settings: LoadSettings = DEFAULT_LOAD,
    quantization_config: Any = None,
) -> Any:
    """A causal LM in eval mode. `device_map="auto"` splits a large model over local GPUs;
    `quantization_config` (e.g. bitsandbytes' 4 bits for QLoRA) quantizes it as it loads."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    source = resolve_source(spec)
    kwargs: dict[str, Any] = {"dtype": dtype, **settings.hub_kwargs(source)}
    if settings.attn_implementation != "sdpa":
        kwargs["attn_implementation"] = settings.attn_implementation
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if device_map:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            source.path, output_loading_info=True, **kwargs
        )
    except Exception as error:
        raise _hub_error(source, error) from None
    check_loading_report(spec, model, loading)
    if getattr(model.config, "quantization_config", None) is not None and source.gguf_file:
        model.config.quantization_config = None
    if device is not None and not device_map:
        model.to(device)
    check_finite_weights(spec, model)
    model.eval()
    return model


def check_finite_weights(spec: str, model: Any) -> None:
    """Refuse a model with a NaN or infinite weight, naming the first such tensor (it would train
    to NaN, or generate nothing and score 0 with no word). Integer (quantized) tensors are
    skipped. One reduction per tensor, on the device the model is on."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise DeltakdError(
                    f"model {spec}: the weight {name} holds {bad} NaN or infinite values; "
                    "the checkpoint is damaged or diverged"
                )


def _matches_any(key: str, patterns: Any) -> bool:
    return any(re.search(pattern, key) for pattern in patterns or ())


def check_loading_report(spec: str, model: Any, loading: dict[str, Any]) -> None:
    """Refuse a checkpoint whose weights do not fill the architecture: a missing tensor would be
    left randomly initialised (transformers only warns). Keys the architecture ties to another
    (lm_head to the embeddings) or declares as optional are not counted."""
    tied: list[str] = []
    if getattr(model.config, "tie_word_embeddings", False):  # the class lists what it may tie
        declared = getattr(model, "_tied_weights_keys", None) or ()
        tied = list(declared.keys()) if isinstance(declared, dict) else list(declared)
    missing = sorted(
        key
        for key in loading.get("missing_keys", ())
        if not _matches_any(key, getattr(model, "_keys_to_ignore_on_load_missing", None))
        and key not in tied
    )
    unexpected = sorted(
        key
        for key in loading.get("unexpected_keys", ())
        if not _matches_any(key, getattr(model, "_keys_to_ignore_on_load_unexpected", None))
    )
    mismatched = [str(entry[0]) for entry in loading.get("mismatched_keys", ())]
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mismatched", mismatched),
    ):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    problems += [str(message).splitlines()[0] for message in loading.get("error_msgs", ())]
    if problems:
        raise DeltakdError(
            f"{spec}: its weights do not match its architecture: {'; '.join(problems)}; "
            "refusing a partly random model (is the checkpoint complete?)"
        )


def model_config(spec: str, settings: LoadSettings = DEFAULT_LOAD) -> Any:
    """A model's configuration alone (no weights read)."""
    from transformers import AutoConfig

    source = resolve_source(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    kwargs.update(settings.hub_kwargs(source))
    try:
        return AutoConfig.from_pretrained(source.path, **kwargs)
    except Exception as error:
        raise _hub_error(source, error) from None


def max_positions(spec: str, settings: LoadSettings = DEFAULT_LOAD) -> int | None:
    """The longest sequence a model was made for (its config's position limit), if it says."""
    config = model_config(spec, settings)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


DEFAULT_MAX_LENGTH = 1024


def resolve_max_length(
    requested: int | None, specs: dict[str, str], settings: LoadSettings = DEFAULT_LOAD
) -> int:
    """The tokens per example: `requested` when every model can read that many (else refused),
    or by default 1024, or fewer when a model's positions end sooner."""
    limits = {role: max_positions(spec, settings) for role, spec in specs.items()}
    if requested is None:
        return min([DEFAULT_MAX_LENGTH, *(limit for limit in limits.values() if limit)])
    for role, limit in limits.items():
        if limit is not None and requested > limit:
            raise DeltakdError(
                f"--max-length {requested} is longer than {role} {specs[role]} can read "
                f"(max_position_embeddings {limit}); use --max-length {limit} or less"
            )
    return requested


def stored_dtype(spec: str, settings: LoadSettings = DEFAULT_LOAD) -> torch.dtype:
    """The dtype a model's weights are stored in (float32 for GGUF and when unknown)."""
    source = resolve_source(spec)
    if source.gguf_file:
        return torch.float32
    config_path = Path(source.path) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        name = config.get("dtype") or config.get("torch_dtype")
    else:  # a Hub model: its config (from the local Hugging Face cache when offline)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source.path, **settings.hub_kwargs(source))
        except Exception as error:
            raise _hub_error(source, error) from None
        name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        name = str(name).removeprefix("torch.") if name is not None else None
    if name in ("float32", "bfloat16", "float16"):
        return getattr(torch, name)
    return torch.float32


# ----------------------------------------------------------------------------- the model's parts


def decoder_of(model: Any) -> Any:
    """The model without its output layer (hidden states out): what both the cache and training
    run before `head_logits`."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if decoder is None or decoder is model:
        raise DeltakdError(
            f"{type(model).__name__}: cannot find the decoder (hidden states before the output "
            "layer); this architecture is not supported"
        )
    return decoder


def decoder_layers(model: Any) -> tuple[str, Any]:
    """(state-dict prefix, module list) of the decoder layers, e.g. ('model.layers.', ...)."""
    from torch import nn

    decoder = decoder_of(model)
    prefix = getattr(model, "base_model_prefix", "model")
    count = int(model.config.num_hidden_layers)
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) == count:
            return f"{prefix}.{name}.", layers
    raise DeltakdError(f"{type(model).__name__}: cannot find its list of {count} decoder layers")


def head_logits(model: Any, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The one hidden -> logits step, shared by the cache and training: the output layer, the
    config's logit scaling (Cohere's `logit_scale`) and final soft-capping (Gemma 2's
    `final_logit_softcapping`), sliced to the working vocabulary (padded output layers have extra
    rows). [n, H] -> [n, vocab_size]."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.device))
    config = model.config
    scale = getattr(config, "logit_scale", None)
    if scale:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits[:, :vocab_size]


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Tokens the tokenizer can produce (added tokens included)."""
    return len(tokenizer)


def model_vocab_size(model: Any) -> int:
    """Rows of the output embedding; may exceed the tokenizer's (padded vocabularies)."""
    head = model.get_output_embeddings()
    if head is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_model_vocab(model: Any, vocab_size: int, name: str) -> int:
    """Refuse a model whose output layer is smaller than the working vocabulary (the ids the run
    uses); a padded layer's extra rows are cut off the logits."""
    rows = model_vocab_size(model)
    if rows < vocab_size:
        raise DeltakdError(
            f"{name}: its output layer has {rows} rows but the run uses {vocab_size} token ids"
        )
    return vocab_size


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the token -> id map (which token plays eos or pad is not part of it: see
    vocab.py for what makes tokenizers compatible)."""
    return vocab.vocabulary_sha256(vocab.tokens_by_id(tokenizer))


def _weight_files(source: ModelSource, settings: LoadSettings = DEFAULT_LOAD) -> list[Path]:
    if source.gguf_file:
        return [Path(source.path) / source.gguf_file]
    directory = Path(source.path)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(
                snapshot_download(source.path, revision=settings.revision, local_files_only=True)
            )
        except Exception:
            return []
    return sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def weights_fingerprint(spec: str, settings: LoadSettings = DEFAULT_LOAD) -> str:
    """sha256 over the model's weight files (names and contents): what provenance compares.
    Independent of the dtype the model is later loaded in."""
    source = resolve_source(spec)
    files = _weight_files(source, settings)
    if not files:
        raise DeltakdError(f"cannot find the weight files of '{spec}' to fingerprint them")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def model_identity(
    spec: str, tokenizer: Any, settings: LoadSettings = DEFAULT_LOAD
) -> dict[str, Any]:
    """Provenance record of one model: how it was named, its revision, its hashes, and its
    tokenizer's special-token roles and chat template."""
    source = resolve_source(spec)
    revision = None if source.is_local else settings.revision
    config_path = Path(source.path) / "config.json"
    if config_path.exists():
        revision = json.loads(config_path.read_text()).get("_commit_hash") or revision
    return {
        "spec": spec,
        "path": str(Path(source.path).resolve()) if source.is_local else source.path,
        "gguf_file": source.gguf_file,
        "revision": revision,
        "weights_sha256": weights_fingerprint(spec, settings),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "tokenizer_roles": vocab.roles_of(tokenizer),
        "trust_remote_code": settings.trust_remote_code,
        "license": card_license(source, settings),
    }


def card_license(source: ModelSource, settings: LoadSettings = DEFAULT_LOAD) -> str | None:
    """The license a model's own card declares (README.md metadata): a local directory's, or a
    Hub model's from the local Hugging Face cache (never downloaded). None when it has none."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme: Any = Path(source.path) / "README.md"
    if not source.is_local:
        readme = try_to_load_from_cache(source.path, "README.md", revision=settings.revision)
    if not isinstance(readme, (str, Path)) or not Path(readme).is_file():
        return None
    try:
        declared = ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a card that does not parse declares nothing we can read
        return None
    return declared if isinstance(declared, str) and declared else None


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain Hugging Face directory (float32 safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise DeltakdError(f"GGUF file not found: {gguf_path}")
    directory, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    staging = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if getattr(loaded, "generation_config", None) is not None:
        loaded.generation_config.save_pretrained(staging)
    staging.rename(out_dir)
    return out_dir
