"""``recall-dist torchrun [torchrun options] -m recall_dist train CONFIG [key=value ...]``: torchrun, with
the exit codes and signal handling a scheduler needs (docs/robustness.md).

Same arguments as ``torchrun`` (it runs ``python -m torch.distributed.run`` with them).  Differences:

- SIGTERM or SIGUSR1 to this process touches ``$RECALL_DIST_STOP_FILE`` (one of its own if unset)
  instead of reaching torchrun: the workers agree at the next step boundary, save a checkpoint and stop,
  with no kill deadline.  A second SIGTERM is passed on to torchrun (which stops the workers at once).
  SIGINT, SIGHUP and SIGQUIT are passed on as they are.
- The exit code is the run's, which local rank 0 reports through ``$RECALL_DIST_OUTCOME_FILE``: 0
  finished or stopped after saving (``<output_dir>/PREEMPTED``), 2 refused to start, 3 diverged, 1
  failed -- torchrun itself exits 1 after any signal or failed worker, so a scheduler could not tell.
  Without a report (the sweep, a worker killed): torchrun's own code, 128 + N when killed by signal N.
- torchrun dies with this process (``PR_SET_PDEATHSIG``), and its workers die with torchrun.
- ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (how long torchrun waits for the workers after it is signalled
  directly, e.g. by Slurm's job-wide SIGTERM, before it SIGKILLs them) defaults to 600 s, not 30 s:
  a large model's checkpoint takes minutes to write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from recall_dist.log import get_logger
from recall_dist.train.preemption import OUTCOME_FILE_ENV, STOP_FILE_ENV

log = get_logger("torchrun")
SHUTDOWN_TIMEOUT_S = "600"
_PASSED_ON = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


# Runs in the child before torchrun replaces it (exec keeps PR_SET_PDEATHSIG): die with this wrapper.
# Not a preexec_fn, which is unsafe in a process with threads.
_SHIM = """import os, sys
from recall_dist.train.preemption import die_with_parent
die_with_parent()
if os.getppid() != int(sys.argv[1]):  # the wrapper died before the prctl took effect
    sys.exit(1)
os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *sys.argv[2:]])
"""


def _start(argv: list[str], env: dict) -> subprocess.Popen:
    # Its own session: a terminal's Ctrl-C reaches torchrun once, from us, not twice.
    return subprocess.Popen([sys.executable, "-c", _SHIM, str(os.getpid()), *argv], env=env, start_new_session=True)


def _exit_code(returncode: int, outcome_file: Path) -> tuple[int, str]:
    try:
        report = json.loads(outcome_file.read_text())
    except (OSError, ValueError):
        report = None
    if report is not None:
        return int(report["exit_code"]), f"the workers report: {report.get('outcome')}"
    if returncode < 0:
        return 128 - returncode, f"torchrun was killed by signal {-returncode}"
    return returncode, "no report from the workers: torchrun's exit code"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="recall-dist-torchrun-"))
    stop_file = Path(os.environ.get(STOP_FILE_ENV) or scratch / "STOP")
    outcome_file = scratch / "outcome.json"
    env = dict(os.environ, **{STOP_FILE_ENV: str(stop_file), OUTCOME_FILE_ENV: str(outcome_file)})
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    proc = _start(argv, env)
    stops = 0

    def on_stop(signum, frame) -> None:
        nonlocal stops
        stops += 1
        if stops == 1 or signum == signal.SIGUSR1:
            stop_file.parent.mkdir(parents=True, exist_ok=True)
            stop_file.touch()
            # Not through logging: a signal handler must not take the logging lock the interrupted code
            # may hold.  Same format as get_logger's lines.
            print(
                f"recall-dist torchrun: {signal.Signals(signum).name}: asking the workers to checkpoint and "
                f"stop ({stop_file}); send SIGTERM again to stop them at once",
                file=sys.stderr,
                flush=True,
            )
        else:
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_stop)
    for sig in _PASSED_ON:
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    try:
        returncode = proc.wait()
        code, why = _exit_code(returncode, outcome_file)
    finally:
        for path in scratch.iterdir():
            path.unlink(missing_ok=True)
        scratch.rmdir()
    log.info("exit %d (%s; torchrun exited %d)", code, why, returncode)
    return code


if __name__ == "__main__":
    sys.exit(main())
