"""``recall-dist demo-text`` and ``recall-dist demo-lm``: each demo, or with ``--grid`` its recipe grid
(``demo/text_grid.py``, ``demo/lm_grid.py``), which have their own options.  The choice lives here so that
neither a demo nor its grid imports the other's command line."""

from __future__ import annotations

import sys


def _args(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def demo_text(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if "--grid" in args:
        from recall_dist.demo.text_grid import main
    else:
        from recall_dist.demo.fortunes import main
    return main(args)


def demo_lm(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if "--grid" in args:
        from recall_dist.demo.lm_grid import main
    else:
        from recall_dist.demo.iso import main
    return main(args)
