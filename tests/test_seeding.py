"""``recall_dist/seeding.py``: derived seeds are pinned values (the demos' numbers depend on them),
pure functions of their parts, and sensitive to every part and its order."""

from __future__ import annotations

import subprocess
import sys

from recall_dist.seeding import derive_seed


def test_derive_seed_pinned_values():
    # Computed by the original eval/known_support.py function: moving it must not change a sample.
    assert derive_seed(0, "nll", 1.0, "p") == 1847103722314933412
    assert derive_seed(1234, "m-s2", 0.8, "text", 7) == 9071823356317599576


def test_derive_seed_is_a_pure_function_across_processes():
    code = "from recall_dist.seeding import derive_seed; print(derive_seed(3, 'model', 0.5, 'prompt'))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert int(out) == derive_seed(3, "model", 0.5, "prompt")


def test_derive_seed_depends_on_every_part_and_order():
    base = derive_seed(1, "a", 0.5)
    others = {derive_seed(2, "a", 0.5), derive_seed(1, "b", 0.5), derive_seed(1, "a", 0.6), derive_seed(0.5, "a", 1)}
    assert base not in others and len(others) == 4
    assert all(0 <= s < 2**63 for s in others | {base})
