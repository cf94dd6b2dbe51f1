"""A PNG of a run's curves: training loss, and domain/general perplexity at each evaluation."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: str | Path, log=print) -> Path | None:
    """Write run_dir/curves.png; None (with a message) when matplotlib is not installed."""
    try:  # a Figure without pyplot: no backend switch, nothing left open in a notebook's pyplot state
        from matplotlib.figure import Figure
    except ImportError:
        log("(install matplotlib, e.g. pip install 'lora-cpt[plot]', for curves.png)")
        return None
    run_dir = Path(run_dir)
    from lora_cpt.rundir import CURVES, METRICS, REPORT, read_metrics

    lines = read_metrics(run_dir / METRICS)  # a line cut short by a kill is skipped
    losses = [(x["step"], x["loss"]) for x in lines if "loss" in x]
    evals = {name: [(x["step"], x[f"{name}_ppl"]) for x in lines if f"{name}_ppl" in x]
             for name in ("domain", "general")}
    report = run_dir / REPORT
    if report.is_file():  # the final evaluation closes the perplexity curves
        data = json.loads(report.read_text())
        for name, row in (data.get("eval") or {}).items():
            if "adapter" in row and name in evals:
                evals[name].append((data["train"]["steps"], row["adapter"]["ppl"]))
                evals[name].insert(0, (0, row["base"]["ppl"]))  # step 0: the base model
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    if losses:
        left.plot(*zip(*losses), label="training loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_title("training loss")
    for name, points in evals.items():
        if points:
            right.plot(*zip(*sorted(points)), marker="o", label=f"{name} perplexity")
    right.set_xlabel("step")
    right.set_ylabel("perplexity")
    right.set_title("held-out perplexity (step 0: base)")
    right.legend()
    fig.tight_layout()
    out = run_dir / CURVES
    fig.savefig(out, dpi=100)
    return out
