"""recall_dist/cli.py, the ``recall-dist`` dispatcher: ``--help`` lists every command and imports none of
them, an unknown command exits 2 naming the known ones, a command gets the rest of the arguments and its
return value is the exit code, and a torchrun worker asks to die with torchrun before anything else."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from recall_dist import cli

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    for argv in ([], ["--help"], ["-h"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
        assert listed == ["train", "torchrun", "plan", "sweep", "demo", "demo-text", "demo-lm", "convert-gguf"]


def test_help_imports_no_command():
    heavy = ["deepspeed", "transformers", *sorted({module for module, _ in cli.COMMANDS.values()})]
    code = (
        "import sys; from recall_dist.cli import main; main(['--help']); "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines()[-1] == "[]"


def test_an_unknown_command_exits_2_naming_the_known_ones(capsys):
    assert cli.main(["trian", "config.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recall-dist: unknown command 'trian'; known: train, torchrun, plan, sweep, demo,")


@pytest.fixture
def fake_command(monkeypatch):
    """A command ``fake`` whose module records the arguments it is called with and returns ``code``."""
    calls = []
    module = types.ModuleType("fake_command_module")
    module.main = lambda argv: calls.append(argv) or module.code
    module.code = None
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "for the test"))
    return module, calls


def test_a_command_gets_the_rest_and_its_return_value_is_the_exit_code(fake_command):
    module, calls = fake_command
    assert cli.main(["fake", "a.yaml", "x=1", "--flag"]) == 0  # None: success
    module.code = 3
    assert cli.main(["fake"]) == 3
    assert calls == [["a.yaml", "x=1", "--flag"], []]


def test_a_torchrun_worker_dies_with_torchrun(fake_command, monkeypatch):
    import recall_dist.train.preemption as preemption

    module, _ = fake_command
    order = []
    monkeypatch.setattr(preemption, "die_with_parent", lambda: order.append("die_with_parent"))
    module.main = lambda argv: order.append("command")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    cli.main(["fake"])
    assert order == ["command"]  # not under torchrun: nothing to die with
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    cli.main(["fake"])
    assert order == ["command", "die_with_parent", "command"]
