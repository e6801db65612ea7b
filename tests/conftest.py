"""Session fixtures: a tokenizer trained here, tiny Llama teachers and a student, and JSONL data.

Everything is built once per session under a temp dir; nothing comes from the network."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread each is faster than two fighting over 2 cores (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

WORDS = (
    "the a model learns to write short titles for long abstracts about language data training "
    "student teacher distillation shift delta tokens cache shard zarr gradient loss small large "
    "quick brown fox jumps over lazy dog river mountain city night day sun moon star cloud rain"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def make_rows(count: int, seed: int = 0) -> list[dict]:
    """Prompt/response rows whose response is a simple function of the prompt (learnable)."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        prompt = _sentence(rng, 4, 14)
        response = " ".join(prompt.split()[:3][::-1]) + " " + _sentence(rng, 1, 6)
        rows.append({"id": f"row-{index}", "prompt": prompt, "response": response})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    corpus = [_sentence(rng, 5, 20) for _ in range(400)] + list(WORDS)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_model(directory: Path, tokenizer, layers: int, hidden: int, seed: int, vocab_rows=None):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_rows or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than default init so distributions are not near-uniform
        model.lm_head.weight.mul_(8.0)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class Fixture:
    """Paths of the tiny world: tokenizer, models, data."""

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer = build_tokenizer(root / "tokenizer")
        self.vocab_size = len(self.tokenizer)
        self.teacher_base = build_model(root / "teacher-base", self.tokenizer, 2, 64, seed=1)
        self.teacher_tuned = root / "teacher-tuned"
        self._perturb(self.teacher_base, self.teacher_tuned, seed=2)
        self.student = build_model(root / "student", self.tokenizer, 1, 32, seed=3)
        self.train = write_jsonl(root / "train.jsonl", make_rows(24, seed=0))
        self.test = write_jsonl(root / "test.jsonl", make_rows(8, seed=99))

    def _perturb(self, source: Path, target: Path, seed: int) -> None:
        """The tuned teacher: the base with a small random shift of every weight."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(0.3 * parameter.std() * noise)
        model.save_pretrained(target)
        self.tokenizer.save_pretrained(target)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread when the 2 cores are shared (no OMP spinning).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Fixture:
    return Fixture(tmp_path_factory.mktemp("tiny"))


class S3Server:
    """moto's S3 server on 127.0.0.1 (a free port), the endpoint set for s3fs (this process
    through fsspec's config, subprocesses through the environment), and one bucket."""

    def __init__(self, bucket: str = "deltakd"):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.bucket = bucket
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint,
        }
        self.fs().mkdir(bucket)

    def options(self) -> dict:
        """s3fs's storage options for this server: a filesystem of its own (fsspec caches
        filesystems by their options, so two servers never share one)."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options())

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def stop(self) -> None:
        self.server.stop()


def s3_or_skip() -> None:
    for name in ("moto.server", "s3fs"):
        try:
            __import__(name)
        except ImportError as error:
            pytest.skip(f"the local S3 server needs moto[server] and s3fs ({error})")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A local S3 server for the session; s3:// URLs in this process and its subprocesses
    reach it. Skips where moto or s3fs cannot be imported."""
    s3_or_skip()
    import fsspec.config

    server = S3Server()
    saved_env = {name: os.environ.get(name) for name in server.env}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(server.env)
    fsspec.config.conf["s3"] = server.options()
    yield server
    server.stop()
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if saved_conf is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = saved_conf
