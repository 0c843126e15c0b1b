"""recall_dist/log.py: one format for what the package reports, on the stderr of the moment."""

from __future__ import annotations

import logging
import subprocess
import sys

from recall_dist.log import get_logger


def test_format_and_levels(capsys):
    log = get_logger("train")
    log.info("resumed from %s at step %d", "/runs/a/step_00000002", 2)
    log.warning("checkpoint %s is damaged", "step_3")
    log.debug("not shown at the default level")
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "recall-dist train: resumed from /runs/a/step_00000002 at step 2",
        "recall-dist train: WARNING: checkpoint step_3 is damaged",
    ]


def test_each_line_once_whatever_the_root_logger_does(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    try:
        get_logger("torchrun").info("exit 0")
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr().err == "recall-dist torchrun: exit 0\n"


def test_a_fresh_process_prints_to_stderr():
    code = "from recall_dist.log import get_logger; get_logger('sweep').warning('x=%d', 3)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (proc.stdout, proc.stderr) == ("", "recall-dist sweep: WARNING: x=3\n")
