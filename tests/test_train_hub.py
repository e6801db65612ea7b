"""Sharing on the Hub (train/hub.py, train/card.py): everything up to the network call, offline.
HfApi.create_repo and upload_folder are replaced by recorders; the upload itself is not run.
The exported folder loads with from_pretrained, its card (and the adapter's) parses with
huggingface_hub's ModelCard and holds base_model, datasets, license, tags and model-index, and no
card names a local path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, constants

from deltakd_cli.errors import DeltakdError
from deltakd_cli.pipeline.options import PipelineOptions
from deltakd_cli.pipeline.plan import check_inputs
from deltakd_cli.pipeline.run import push_student
from deltakd_cli.train import card, hub
from tests.helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = "someone/tiny-student"
LICENSE = "apache-2.0"


class Uploads:
    """What the push asked of the Hub (nothing leaves this machine). The Hub's answers before
    training: `user` owns `namespaces`; `existing` repositories exist; `reachable` False makes
    every call fail as a dropped connection does."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.uploaded: list[dict] = []
        self.asked: list[str] = []  # the calls made before training
        self.user = "someone"
        self.orgs: list[str] = ["some-org"]
        self.role = "write"
        self.existing: set[str] = set()
        self.reachable = True

    def whoami(self, api, token=None, **kwargs):
        self.asked.append("whoami")
        if not self.reachable:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        return {"type": "user", "name": self.user, "orgs": [{"name": o} for o in self.orgs],
                "auth": {"accessToken": {"role": self.role}}}  # fmt: skip

    def repo_info(self, api, repo_id, **kwargs):
        from huggingface_hub.errors import RepositoryNotFoundError

        self.asked.append(f"repo_info {repo_id}")
        if repo_id not in self.existing:
            raise RepositoryNotFoundError(f"404 {repo_id}", response=_response(404))
        return {"id": repo_id}

    def create_repo(self, api, repo_id, **kwargs):
        self.created.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, api, **kwargs):
        self.uploaded.append(kwargs)
        return None


def _response(status: int):
    import httpx

    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api"))


def fake_hub(patch: pytest.MonkeyPatch, recorder: Uploads) -> None:
    """HfApi's calls answered by `recorder`, a token in HF_TOKEN, offline mode off."""
    patch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: recorder.create_repo(
        api, repo_id, **kw))  # fmt: skip
    patch.setattr(HfApi, "upload_folder", lambda api, **kw: recorder.upload_folder(api, **kw))
    patch.setattr(HfApi, "whoami", lambda api, **kw: recorder.whoami(api, **kw))
    patch.setattr(HfApi, "repo_info", lambda api, repo_id, **kw: recorder.repo_info(
        api, repo_id, **kw))  # fmt: skip
    patch.setenv("HF_TOKEN", "hf_not_a_real_token")
    patch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline


@pytest.fixture
def uploads(monkeypatch) -> Uploads:
    recorder = Uploads()
    fake_hub(monkeypatch, recorder)
    return recorder


@pytest.fixture(scope="module")
def licensed_student(tiny, tmp_path_factory) -> Path:
    """The tiny student with a card of its own that declares a license."""
    student = tmp_path_factory.mktemp("hub-student") / "student"
    shutil.copytree(tiny.student, student)
    (student / "README.md").write_text(f"---\nlicense: {LICENSE}\n---\n\n# the student\n")
    return student


@pytest.fixture(scope="module")
def pushed(tiny, licensed_student, tmp_path_factory):
    """A 2-step LoRA finetune with --save-adapter and --push-to-hub, the Hub replaced by a
    recorder: (OUT, the recorder)."""
    out = tmp_path_factory.mktemp("hub-run") / "tiny-student"
    recorder = Uploads()
    patch = pytest.MonkeyPatch()
    fake_hub(patch, recorder)
    try:
        result = run_cli(
            ["finetune", "--model", licensed_student, "--data", tiny.train, "--out", out,
             "--max-steps", 2, "--batch-size", 4, "--save-every", 1, "--lora-r", 2,
             "--save-adapter", "--device", "cpu", "--push-to-hub", REPO, "--hub-private"]
        )  # fmt: skip
    finally:
        patch.undo()
    assert result.exit_code == 0, result.output
    return out, recorder


def test_push_to_hub_uploads_the_model_files_card_and_adapter_only(pushed):
    out, recorder = pushed
    assert recorder.created == [{"repo_id": REPO, "exist_ok": True, "private": True}]
    assert recorder.asked == ["whoami", f"repo_info {REPO}"]  # checked before training
    (call,) = recorder.uploaded
    assert call["folder_path"] == str(out) and call["repo_id"] == REPO
    files = call["allow_patterns"]
    for expected in ("config.json", "model.safetensors", "tokenizer.json", "README.md",
                     "generation_config.json", "adapter/adapter_config.json",
                     "adapter/adapter_model.safetensors", "adapter/README.md"):  # fmt: skip
        assert expected in files, expected
    assert (out / "checkpoints").is_dir() and (out / "run.json").is_file()
    assert not [
        f for f in files if f.startswith("checkpoints") or f in ("run.json", "metrics.jsonl")
    ]
    assert all((out / f).is_file() for f in files)


def test_the_pushed_folder_loads_and_its_card_holds_the_metadata(pushed, tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = pushed
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    data = ModelCard.load(out / "README.md").data
    assert data.license == LICENSE  # the student's own card's
    assert data.library_name == "transformers"
    assert {"deltakd", "knowledge-distillation"} <= set(data.tags)
    assert data.base_model is None  # a local student: no Hub id to name
    adapter = ModelCard.load(out / "adapter" / "README.md").data
    assert adapter.library_name == "peft" and adapter.license == LICENSE
    assert "lora" in adapter.tags
    assert PeftModel.from_pretrained(model, out / "adapter") is not None


def test_no_card_names_a_local_path(pushed):
    out, _ = pushed
    root = str(out.parent.parent)  # the tmp dirs of this session
    for text in ((out / "README.md").read_text(), (out / "adapter" / "README.md").read_text()):
        assert root not in text and "/tmp" not in text
        assert "`student`" in text  # the student by its folder name, with its hashes


def test_deltakd_push_uploads_a_model_directory(pushed, uploads):
    out, _ = pushed
    result = run_cli(["push", out, REPO])
    assert result.exit_code == 0, result.output
    assert uploads.created == [{"repo_id": REPO, "exist_ok": True, "private": None}]
    (call,) = uploads.uploaded
    assert call["folder_path"] == str(out) and "model.safetensors" in call["allow_patterns"]
    result = run_cli(["push", out / "adapter", "someone/tiny-adapter", "--private"])
    assert result.exit_code == 0, result.output
    assert uploads.uploaded[1]["allow_patterns"] == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip
    assert uploads.created[1]["private"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["push", "{tmp}", REPO], "not a model directory"),
        (["push", "{tmp}/missing", REPO], "not a directory"),
        (["push", "{out}", "not a repo!"], "REPO 'not a repo!' is not a Hub repository id"),
    ],
)
def test_push_refuses_what_is_not_a_model_or_a_repo(pushed, uploads, tmp_path, args, message):
    out, _ = pushed
    args = [a.format(tmp=tmp_path, out=out) for a in args]
    assert_one_line_error(run_cli(args), message)
    assert uploads.created == [] and uploads.uploaded == []


def test_a_failed_upload_is_one_line_and_keeps_the_model(pushed, uploads, monkeypatch):
    out, _ = pushed

    def refuse(api, **kwargs):
        raise ConnectionError("Cannot reach the Hub\nmore detail")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    result = run_cli(["push", out, REPO])
    assert_one_line_error(result, "push of", "failed (ConnectionError: Cannot reach the Hub)",
                          "the model is still in", f"deltakd push {out} {REPO}")  # fmt: skip
    assert (out / "model.safetensors").is_file()


def test_a_users_offline_mode_is_kept(pushed, uploads, monkeypatch):
    out, _ = pushed
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DeltakdError, match="HF_HUB_OFFLINE is set"):
        hub.push_folder(out, REPO)
    assert uploads.uploaded == []
    hub.push_folder(out, REPO, go_online=True)  # the pipeline's own offline mode is lifted
    assert len(uploads.uploaded) == 1 and constants.HF_HUB_OFFLINE is True


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--push-to-hub", "a/b/c"], "--push-to-hub 'a/b/c' is not a Hub repository id"),
        (["--hub-private"], "--hub-private needs --push-to-hub"),
    ],
)
def test_train_refuses_a_bad_push_before_training(tiny, tmp_path, extra, message):
    out = tmp_path / "out"
    args = ["finetune", "--model", tiny.student, "--data", tiny.train, "--out", out,
            "--max-steps", 1, "--device", "cpu", *extra]  # fmt: skip
    assert_one_line_error(run_cli(args), message)
    assert not out.exists()


@pytest.mark.parametrize(
    "hub, message",
    [
        ({"offline": True}, "HF_HUB_OFFLINE is set, so nothing could be pushed"),
        ({"token": None}, "needs a Hugging Face token: set HF_TOKEN or run hf auth login"),
        ({"reachable": False}, "cannot reach the Hugging Face Hub (ConnectionError"),
        ({"role": "read"}, "the token of someone is read-only"),
        ({"repo": "someone-else/x"}, "someone cannot create a repository of someone-else"),
        ({"repo": "someone-else/x", "existing": True}, "someone cannot push to a repository"),
    ],
)
@pytest.mark.parametrize("command", ["finetune", "distill", "pipeline"])
def test_push_to_hub_is_checked_before_any_training(tiny, tmp_path, monkeypatch,
                                                    command, hub, message):  # fmt: skip
    """Offline mode, the token, the Hub's answer, the token's rights and the repository's
    namespace are checked before the first step (before: after training, exit 2). Checked
    before anything is read: distill's cache need not exist yet."""
    recorder = Uploads()
    fake_hub(monkeypatch, recorder)
    repo = hub.get("repo", REPO)
    if hub.get("offline"):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "token" in hub:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved token either
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    recorder.reachable = hub.get("reachable", True)
    recorder.role = hub.get("role", "write")
    if hub.get("existing"):
        recorder.existing.add(repo)
    out = tmp_path / "out"
    args = {
        "finetune": ["finetune", "--model", tiny.student, "--data", tiny.train, "--out", out,
                     "--max-steps", 1, "--device", "cpu"],
        "distill": ["distill", "--cache", tmp_path / "cache", "--student", tiny.student, "--out",
                    out, "--max-steps", 1, "--device", "cpu"],
        "pipeline": ["pipeline", "--teacher-base", tiny.teacher_base, "--teacher-tuned",
                     tiny.teacher_tuned, "--student", tiny.student, "--train", tiny.train,
                     "--test", tiny.test, "--out", out, "--max-steps", 1, "--device", "cpu"],
    }[command]  # fmt: skip
    assert_one_line_error(run_cli([*args, "--push-to-hub", repo]), message)
    assert not out.exists() and recorder.uploaded == [] and recorder.created == []


def test_a_creatable_repository_passes_the_check(uploads):
    assert hub.check_hub_access("some-org/new-model", "--push-to-hub") == "someone"
    uploads.existing.add(REPO)
    assert hub.check_hub_access(REPO, "--push-to-hub") == "someone"
    assert uploads.created == []  # checking creates nothing


def pipeline_options(tiny, **given) -> PipelineOptions:
    return PipelineOptions(teacher_base=str(tiny.teacher_base), train=str(tiny.train),
                           test=str(tiny.test), student=str(tiny.student), **given)  # fmt: skip


def test_pipeline_pushes_the_delta_student_or_the_named_one(tiny, pushed, uploads, tmp_path):
    out, _ = pushed
    other = tmp_path / "student-kd"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("checkpoints"))
    roles = {"student-delta": [str(out)], "student-kd": [str(other)]}
    push_student(pipeline_options(tiny, push_to_hub=REPO), roles, None, go_online=False)
    options = pipeline_options(tiny, push_to_hub=REPO, push_role="student-kd")
    push_student(options, roles, None, go_online=False)
    assert [call["folder_path"] for call in uploads.uploaded] == [str(out), str(other)]
    with pytest.raises(DeltakdError, match="--push-role student-x: the pipeline trains no such"):
        check_inputs(pipeline_options(tiny, push_to_hub=REPO, push_role="student-x"))
    with pytest.raises(DeltakdError, match="--push-role needs --push-to-hub"):
        check_inputs(pipeline_options(tiny, push_role="student-kd"))


# ----------------------------------------------------------------------------- the card alone

DOLLY = "databricks/databricks-dolly-15k"
HUB_RECORD = {
    "version": "0.2.0",
    "command": "distill",
    "options": {"out": "/home/me/runs/p/models/student-delta", "objective": "delta",
                "alpha": 1.0, "sft_weight": 0.0, "epochs": 1, "lr": 1e-4, "batch_size": 8},
    "resolved": {"total_steps": 4, "world_size": 1},
    "student": {"spec": "HuggingFaceTB/SmolLM2-135M", "path": "HuggingFaceTB/SmolLM2-135M",
                "weights_sha256": "ab" * 32, "license": "apache-2.0"},
    "provenance": {
        "cache": {"path": "/home/me/runs/p/cache", "k": 8, "manifest_sha256": "cd" * 32},
        "cache_provenance": {
            "teacher_base": {"spec": "/home/me/models/teacher", "path": "/home/me/models/teacher",
                             "weights_sha256": "ef" * 32},
            "data": {"hub": DOLLY, "spec": DOLLY, "sha256": "34" * 32},
        },
    },
    "final_metrics": {"final_loss": 1.0},
}  # fmt: skip


def test_the_card_metadata_names_hub_sources_and_the_rouge_l():
    evaluation = {"rouge_l": 27.123, "std": 0.4, "rows": 50, "protocol": "greedy",
                  "report": "/home/me/runs/p/eval/report.json",
                  "data": {"spec": "/home/me/data/test.jsonl", "path": "/home/me/data/test.jsonl",
                           "sha256": "56" * 32}}  # fmt: skip
    text = card.model_card(HUB_RECORD, evaluation)
    data = ModelCard(text).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert data.datasets == [DOLLY]
    assert data.license == "apache-2.0"
    assert data.tags == ["deltakd", "knowledge-distillation", *card.objective_summary(
        HUB_RECORD["options"])[1]]  # fmt: skip
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value) == ("rougeL", 27.12)
    assert result.dataset_name == "test.jsonl" and data.model_name == "student-delta"
    assert "/home/me" not in text
    for name in ("# student-delta", "`teacher`", "`cache`", "`test.jsonl`", "`report.json`",
                 "`HuggingFaceTB/SmolLM2-135M`", "`efefefefefef`"):  # fmt: skip
        assert name in text, name


def test_a_local_student_and_local_rows_give_no_hub_metadata():
    record = {**HUB_RECORD, "student": {"spec": "./student", "path": "/home/me/student"},
              "provenance": {"data": {"path": "/home/me/rows.jsonl", "spec": "rows.jsonl",
                                      "sha256": "12" * 32}}}  # fmt: skip
    text = card.model_card(record)
    data = ModelCard(text).data
    assert data.base_model is None and data.datasets is None and data.license is None
    assert data.eval_results is None
    assert "/home/me" not in text and "`rows.jsonl`" in text and "`student`" in text


@pytest.mark.parametrize(
    "given, shown",
    [
        ("/tmp/x/student", "student"),
        ("/tmp/x/student/", "student"),
        ("runs/x/student-base", "student-base"),
        ("~/models/m.gguf", "m.gguf"),
        ("file:///data/rows.jsonl", "rows.jsonl"),
        ("C:\\models\\student", "student"),
        ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B"),
        ("train.jsonl", "train.jsonl"),
    ],
)
def test_a_location_is_shown_by_name_never_by_path(given, shown):
    assert card.public_name(given) == shown


def test_a_pipeline_stage_key_ignores_the_push_options(tmp_path):
    """The push options change nothing a stage makes: a pipeline made before they existed is
    not redone."""
    from deltakd_cli.pipeline.stages import Stage
    from deltakd_cli.train.options import DistillOptions

    def key(**push) -> str:
        options = DistillOptions(cache="c", student="s", out=str(tmp_path), **push)
        return Stage("distill delta", "distill", options, tmp_path, "run.json").key

    assert key() == key(push_to_hub="me/x", hub_private=True)
