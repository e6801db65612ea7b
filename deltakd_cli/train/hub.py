"""Sharing a model directory on the Hugging Face Hub: `deltakd push DIR REPO`, and
`--push-to-hub REPO` of distill, finetune and pipeline once the model is exported. Only the model
files, the model card and the adapter directory are uploaded: never checkpoints/, run.json
(it records local paths), metrics.jsonl or the trackers' folders. huggingface_hub is imported
only when a push runs (the CLI's help imports nothing heavy)."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deltakd_cli import outputs
from deltakd_cli.console import info
from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import check
from deltakd_cli.train.options import PushOptions, check_repo_id

# The files a Hugging Face model directory is written as (save_pretrained of a model, its
# tokenizer and generation config, a LoRA adapter dir): what a push uploads, and what a run
# record proves deltakd's in the OUT of a run from before output markers (export.py).
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.*",
    "tokenizer.model", "adapter",
)  # fmt: skip
# A peft adapter directory (OUT/adapter, or pushed on its own).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
CARD = "README.md"
ADAPTER_DIR = "adapter"  # OUT/adapter with --save-adapter (train/lora.py writes it)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def upload_files(folder: Path) -> list[str]:
    """The files of `folder` a push uploads (relative, '/'-separated, sorted): a model's or an
    adapter's files, the card, and the adapter directory's files. Refuses a folder that is not
    a model directory or whose export did not finish."""
    if not folder.is_dir():
        raise DeltakdError(f"{folder}: not a directory (give a model directory to push)")
    reason = outputs.unfinished_model(folder)
    if reason is not None:
        raise DeltakdError(f"{folder}: {reason}; nothing pushed")
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise DeltakdError(
            f"{folder}: not a model directory (no config.json or adapter_config.json)"
        )
    chosen: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and _matches(entry.name, (CARD, *MODEL_FILE_PATTERNS, *ADAPTER_FILES)):
            chosen.append(entry.name)
        elif entry.is_dir() and entry.name == ADAPTER_DIR:
            chosen += [
                f"{ADAPTER_DIR}/{part.name}"
                for part in sorted(entry.iterdir())
                if part.is_file() and _matches(part.name, (CARD, *ADAPTER_FILES))
            ]
    return chosen


@contextmanager
def _online(allow: bool) -> Iterator[None]:
    """With `allow`: huggingface_hub's offline mode off for the push (the pipeline turns it on
    for its stages; a user's own HF_HUB_OFFLINE is never overridden)."""
    from huggingface_hub import constants

    if not allow or not constants.HF_HUB_OFFLINE:
        yield
        return
    saved = os.environ.pop("HF_HUB_OFFLINE", None)
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = True
        if saved is not None:
            os.environ["HF_HUB_OFFLINE"] = saved


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return type(error).__name__ + (": " + text.splitlines()[0] if text else "")


def check_hub_access(repo: str, flag: str, *, go_online: bool = False) -> str:
    """Before any training: that `repo` can be pushed to at the end. Offline mode is off (with
    `go_online`, the pipeline's own offline mode is lifted as the push will lift it), a token
    is found, the Hub answers and takes the token, the token may write, and the repository
    exists in, or can be created under, a namespace of the token's user (the user or one of
    their organisations). Each problem is one line; returns the user's name."""
    check_repo_id(repo, flag)
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with _online(go_online):
        if constants.HF_HUB_OFFLINE:
            raise DeltakdError(
                f"{flag} {repo}: HF_HUB_OFFLINE is set, so nothing could be pushed; unset it, "
                f"or drop {flag} (checked before any training)"
            )
        token = get_token()
        if token is None:
            raise DeltakdError(
                f"{flag} {repo} needs a Hugging Face token: set HF_TOKEN or run hf auth login "
                "(checked before any training)"
            )
        api = HfApi()
        try:
            me = api.whoami(token=token)
        except HfHubHTTPError as error:
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status == 401:
                raise DeltakdError(
                    f"{flag} {repo}: the Hub refuses the token (invalid or expired); set HF_TOKEN "
                    "or run hf auth login again (checked before any training)"
                ) from None
            raise DeltakdError(
                f"{flag} {repo}: the Hub did not answer ({_reason(error)}); checked before any "
                "training"
            ) from None
        except Exception as error:  # no network, DNS, TLS, timeouts: one line
            raise DeltakdError(
                f"{flag} {repo}: cannot reach the Hugging Face Hub ({_reason(error)}); "
                f"retry when it is reachable, or drop {flag} and push later with deltakd push"
            ) from None
        user = me.get("name") or "?"
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise DeltakdError(
                f"{flag} {repo}: the token of {user} is read-only; make a write token "
                "(checked before any training)"
            )
        namespaces = {user} | {org.get("name") for org in me.get("orgs") or [] if org.get("name")}
        try:
            api.repo_info(repo, token=token)
            exists = True
        except RepositoryNotFoundError:
            exists = False
        except Exception as error:
            raise DeltakdError(
                f"{flag} {repo}: cannot reach the Hugging Face Hub ({_reason(error)}); "
                f"retry when it is reachable, or drop {flag} and push later with deltakd push"
            ) from None
        owner = repo.split("/")[0]
        if owner not in namespaces:
            doing = "push to" if exists else "create"
            raise DeltakdError(
                f"{flag} {repo}: {user} cannot {doing} a repository of {owner} (the token writes "
                f"under {', '.join(sorted(namespaces))}); checked before any training"
            )
    return user


def push_folder(
    folder: str | Path, repo: str, *, private: bool = False, go_online: bool = False
) -> list[str]:
    """Upload a model directory's model files, card and adapter to the Hub repository `repo`
    (created when missing; `private` only applies then). Returns the files uploaded. Any
    failure of the upload is one line that says the model is still in `folder`."""
    folder = Path(folder)
    check_repo_id(repo, "the repository")
    files = upload_files(folder)
    from huggingface_hub import HfApi, constants

    with _online(go_online):
        if constants.HF_HUB_OFFLINE:
            raise DeltakdError(
                f"cannot push {folder} to {repo}: HF_HUB_OFFLINE is set (unset it to upload)"
            )
        info(f"pushing {folder} to the Hub as {repo}: {len(files)} files")
        api = HfApi()
        try:
            api.create_repo(repo, exist_ok=True, private=private or None)
            api.upload_folder(
                folder_path=str(folder),
                repo_id=repo,
                allow_patterns=files,
                commit_message=f"deltakd push of {folder.name}",
            )
        except Exception as error:  # the network, the token, the Hub: one line, never a trace
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise DeltakdError(
                f"push of {folder} to {repo} failed ({type(error).__name__}"
                f"{': ' + reason if reason else ''}); the model is still in {folder}: "
                f"retry with deltakd push {folder} {repo}"
            ) from None
    info(f"pushed: https://huggingface.co/{repo}")
    return files


def push(options: PushOptions) -> list[str]:
    """`deltakd push DIR REPO`."""
    check(options)
    check_repo_id(options.repo, "REPO")
    return push_folder(options.dir, options.repo, private=options.private)
