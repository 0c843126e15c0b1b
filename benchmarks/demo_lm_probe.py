"""A probe of the demo-lm design (issue: recall losses on a real LM), not part of `make demo-lm`: fine-tune
SmolLM2-135M-Instruct only on the 16 training prompts that demo-lm's sweep scores (each of their ~250 answers
seen ~3.5 times in 56 steps of 16 examples) at lr 1e-4, once per loss, and sweep those 16 prompts exactly.

At demo-lm's defaults (every training prompt, lr 2e-5) NLL ends at Precision 0.02-0.03 at T = 1
(BENCHMARKS.md): SmolLM2 learns the answer format but not the names, so no Precision band is reached.
This probe asks whether a narrower training set makes the known-support comparison measurable.

    python benchmarks/demo_lm_probe.py [--out results/demo-lm-probe] [--losses nll cdiv-1.4] [--lr 1e-4]
                                       [--cdiv-nll-mix 0.5]   # adds c-Div 1.4 with that nll_mix

Writes OUT/data/{train_focused.jsonl,support_train.jsonl}, one fine-tune per loss under OUT/runs/, and the
sweep (sweep.csv: exact Precision and Recall@100, mean over the 16 prompts) in OUT/sweep/; prints the table
and each loss's Recall minus NLL's at NLL's Precision levels (interpolated along the temperature curves).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from recall_dist.demo import iso_prompts
from recall_dist.demo.iso import write_demo_data
from recall_dist.demo.pipeline import CONFIGS, LOSSES, prepare_model, yaml_flow

STEPS, BATCH = 56, 16


def focused_examples(support_train: Path, out: Path, n: int, seed: int = 0) -> Path:
    """``n`` chat examples drawn uniformly over the swept training prompts, then uniformly over the answers."""
    by_prompt: dict[str, list[str]] = {}
    for line in support_train.read_text().splitlines():
        row = json.loads(line)
        by_prompt.setdefault(row["messages"][0]["content"], []).append(row["completion"])
    rng, prompts = random.Random(seed), sorted(by_prompt)
    with open(out, "w") as f:
        for _ in range(n):
            p = rng.choice(prompts)
            messages = [{"role": "user", "content": p}, {"role": "assistant", "content": rng.choice(by_prompt[p])}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return out


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    with open(log, "w") as f:
        if subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
            sys.exit(f"failed: {' '.join(cmd)} (log: {log})")


def margins(curves: dict, reference: str = "nll") -> dict:
    """Recall of each loss minus NLL's, at NLL's Precision levels inside the loss's Precision range."""
    p_ref, r_ref = curves[reference]
    out = {}
    for name, (p, r) in curves.items():
        if name != reference:
            order = np.argsort(p)
            inside = (p_ref >= p.min()) & (p_ref <= p.max())
            at = np.interp(p_ref[inside], p[order], r[order])
            out[name] = list(zip(p_ref[inside], at - r_ref[inside], strict=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/demo-lm-probe")
    ap.add_argument("--losses", nargs="+", default=["nll", "cdiv-1.4"], help=f"of {[s.name for s in LOSSES]}")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cdiv-nll-mix", type=float, default=None, help="also c-Div 1.4 with this nll_mix")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    model = prepare_model(None)
    paths = write_demo_data(out / "data", iso_prompts.build_prompts(), STEPS * BATCH, 16, 16)
    train = focused_examples(paths["support_train"], out / "data" / "train_focused.jsonl", STEPS * BATCH)
    losses = {s.name: (s.loss, s.params) for s in LOSSES}
    if args.cdiv_nll_mix is not None:
        name = f"cdiv-1.4-mix{args.cdiv_nll_mix:g}"
        losses[name] = ("cdiv", {"alpha": 1.4, "nll_mix": args.cdiv_nll_mix})
        args.losses.append(name)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for name in args.losses:
        loss, params = losses[name]
        print(f"fine-tune {name} ...", flush=True)
        run(
            [*torchrun, "-m", "recall_dist", "train", str(CONFIGS / "demo_lm" / "finetune.yaml"),
             f"model.name_or_path={model}", f"data.source={train}", f"train.output_dir={out / 'runs' / name}",
             f"data.num_samples={STEPS * BATCH}", f"optim.lr={args.lr}", f"loss.name={loss}",
             f"loss.params={yaml_flow(params)}", "train.progress_bar=false"],
            out / f"{name}.log",
        )  # fmt: skip
    models = ", ".join(f"{{name: {n}, path: {out / 'runs' / n / 'final'}}}" for n in args.losses)
    print("sweep ...", flush=True)
    run(
        [sys.executable, "-m", "recall_dist", "sweep", str(CONFIGS / "demo_lm" / "sweep.yaml"), f"models=[{models}]",
         f"support={paths['support_train']}", f"output_dir={out / 'sweep'}"],
        out / "sweep.log",
    )  # fmt: skip
    with open(out / "sweep" / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    curves = {
        n: tuple(np.array([float(r[k]) for r in rows if r["model"] == n]) for k in ("precision", "recall"))
        for n in args.losses
    }
    print(f"{'model':<12}{'T':>6}{'precision':>11}{'recall@100':>12}")
    for r in rows:
        print(f"{r['model']:<12}{float(r['temperature']):>6g}{float(r['precision']):>11.4f}{float(r['recall']):>12.4f}")
    if "nll" in curves:
        for name, pairs in margins(curves).items():
            print(f"{name} Recall - NLL's at NLL's Precision: " + ", ".join(f"P {p:.3f}: {m:+.4f}" for p, m in pairs))


if __name__ == "__main__":
    main()
