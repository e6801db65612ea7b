"""A process that imports deltakd (torch, transformers) once and then forks one fresh child per
command, so the reliability tests can launch and kill -9 dozens of real processes without
paying the ~4 s import each time. Each child is a real process running `deltakd ARGS` with its
own environment and output files; the zygote reports how it ended (exit code, or -signal).

Protocol (one JSON object per line): the test writes {"args": [...], "env": {...}, "out": path,
"err": path} to the zygote's stdin; the zygote answers {"started": PID}, then
{"returncode": N} when that child has ended. The zygote itself never
runs any torch code, so forking it is as safe as the DataLoader's own worker forks."""

from __future__ import annotations

import json
import os
import sys


def child(request: dict) -> None:
    """In the forked child: become `deltakd ARGS` and exit with its code."""
    os.environ.update(request.get("env", {}))
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    import torch

    from deltakd_cli import faults
    from deltakd_cli.cache import writer
    from deltakd_cli.cli import main

    torch.set_num_threads(1)
    faults.reset()
    writer.FLUSH_SECONDS = float(os.environ.get("DELTAKD_FLUSH_SECONDS", "60"))
    sys.argv = ["deltakd", *request["args"]]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def warm_up() -> None:
    """The expensive imports, done once: deltakd's, and those transformers makes lazily on its
    first tokenizer and model (about 3 s per process otherwise)."""
    import importlib

    import torch

    torch.set_num_threads(1)  # no thread pool exists when the children are forked
    for name in (
        "deltakd_cli.cli",
        "deltakd_cli.cache.build",
        "deltakd_cli.train.loop",
        "deltakd_cli.evaluate.run",
        "transformers.models.auto.tokenization_auto",
        "transformers.models.auto.modeling_auto",
        "transformers.models.llama.configuration_llama",
        "transformers.models.llama.modeling_llama",
        "transformers.tokenization_utils_fast",
        "transformers.generation",
        "torch.utils.data",
        "safetensors.torch",
        "zarr",
    ):
        importlib.import_module(name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def serve() -> None:
    warm_up()

    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        print(json.dumps({"started": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": code}), flush=True)


if __name__ == "__main__":
    serve()


class Zygote:
    """The test side: start the zygote, run commands through it."""

    def __init__(self, workdir, env: dict[str, str]):
        import subprocess
        from pathlib import Path

        self.workdir = Path(workdir)
        self.count = 0
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert "ready" in json.loads(self.process.stdout.readline())

    def _answer(self, timeout: float) -> dict:
        import select

        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        return json.loads(self.process.stdout.readline())

    def run(self, args: list, env: dict[str, str] | None = None, timeout: float = 180):
        """`deltakd ARGS` in a forked child; a CompletedProcess (returncode -9 when killed).
        A child still running after `timeout` seconds is killed and reported as a hang."""
        import signal
        import subprocess

        self.count += 1
        out = self.workdir / f"launch-{self.count}.out"
        err = self.workdir / f"launch-{self.count}.err"
        request = {"args": [str(a) for a in args], "env": env or {}, "out": str(out),
                   "err": str(err)}  # fmt: skip
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        child_pid = self._answer(30)["started"]
        try:
            code = self._answer(timeout)["returncode"]
        except TimeoutError:
            os.kill(child_pid, signal.SIGKILL)
            self._answer(30)
            raise AssertionError(f"deltakd {args[0]} hung for {timeout} s") from None
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
