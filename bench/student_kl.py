"""How close a base student S0 is to the model it was cut from, on held-out text.

For each demo or pipeline work directory given, it loads the base teacher and the base student
(`models/student-base`, made by init-student; both named in its summary.json), runs both over
the abstracts of the test split (never used for healing or training; each row's `input` as
plain text, its first --tokens tokens), and reports per predicted token
  kl_teacher_student: KL(p_teacher || p_student), nats
  student_ce / teacher_ce: cross-entropy of the next token, nats

    python bench/student_kl.py runs/demo runs/demo-full [--documents 32] [--tokens 128]

Not part of the tests or of `make bench` (it needs demo runs); docs/demo.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltakd_cli import models  # noqa: E402
from deltakd_cli.method.divergences import kl_terms  # noqa: E402


def run_inputs(work: Path) -> tuple[Path, Path]:
    """The base teacher and the test split of a demo or pipeline run (from its summary.json)."""
    summary = json.loads((work / "summary.json").read_text())
    teacher = summary["roles"]["teacher-base"]
    teacher = teacher[0] if isinstance(teacher, list) else teacher  # older summaries: a string
    return Path(teacher), Path(summary["options"]["test"])


def held_out_sequences(test: Path, tokenizer, documents: int, tokens: int) -> list[list[int]]:
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    sequences = []
    for row in rows[:documents]:
        ids = tokenizer(row["input"], add_special_tokens=False)["input_ids"][:tokens]
        if len(ids) > 1:
            sequences.append(ids)
    return sequences


def next_token_logprobs(model_dir: Path, sequences: list[list[int]], vocab: int) -> list:
    model = models.load_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    out = []
    with torch.inference_mode():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1, :vocab]
            out.append(torch.log_softmax(logits.float(), dim=-1))
    del model
    return out


def measure(work: Path, documents: int, tokens: int) -> dict:
    teacher_dir, test = run_inputs(work)
    student_dir = work / "models" / "student-base"
    tokenizer = models.load_tokenizer(str(teacher_dir))
    vocab = models.tokenizer_vocab_size(tokenizer)
    sequences = held_out_sequences(test, tokenizer, documents, tokens)
    teacher = next_token_logprobs(teacher_dir, sequences, vocab)
    student = next_token_logprobs(student_dir, sequences, vocab)
    kl = ce_student = ce_teacher = 0.0
    count = 0
    for ids, t, s in zip(sequences, teacher, student, strict=True):
        nxt = torch.tensor(ids[1:])
        kl += float(kl_terms(t, s).sum())
        ce_student -= float(s.gather(1, nxt[:, None]).sum())
        ce_teacher -= float(t.gather(1, nxt[:, None]).sum())
        count += len(nxt)
    init = json.loads((student_dir / "init-student.json").read_text())
    return {
        "work_dir": str(work),
        "documents": len(sequences),
        "predicted_tokens": count,
        "kept_layers": init.get("kept_layers"),
        "kl_teacher_student": kl / count,
        "student_ce": ce_student / count,
        "teacher_ce": ce_teacher / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dirs", nargs="+", type=Path)
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    for work in args.work_dirs:
        print(json.dumps(measure(work, args.documents, args.tokens)))


if __name__ == "__main__":
    main()
