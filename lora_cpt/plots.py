"""A PNG of a run's curves: training loss, and domain/general perplexity at each evaluation."""

from __future__ import annotations

import json
import struct
from pathlib import Path

PNG_MARKER = "lora-cpt curves"  # the PNG's Software text chunk: a curves.png lora-cpt drew (and may redraw)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_by_us(path: Path) -> bool:
    """Does the PNG at `path` carry our Software text chunk (before its image data)?"""
    try:
        with path.open("rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return False
            for _ in range(64):
                length, kind = struct.unpack(">I4s", f.read(8))
                if kind in (b"IDAT", b"IEND"):
                    return False
                if kind == b"tEXt" and length < 4096:
                    key, _, value = f.read(length).partition(b"\0")
                    if key == b"Software" and value.startswith(PNG_MARKER.encode()):
                        return True
                    f.seek(4, 1)  # the CRC
                else:
                    f.seek(length + 4, 1)
    except (OSError, struct.error):
        return False
    return False


def _curves_by_us(run_dir: Path):
    """curves.png is ours to replace when the run's manifest lists it, or when it carries our marker (a run from
    before manifests has none: a curves.png there may be the user's)."""
    from lora_cpt.rundir import CURVES, read_manifest

    manifest = read_manifest(run_dir)
    listed = manifest is not None and manifest.get("kind") == "run" and CURVES in manifest["entries"]
    return lambda path: listed or _png_by_us(path)


def plot_run(run_dir: str | Path, log=print) -> Path | None:
    """Write run_dir/curves.png; None (with a message) when matplotlib is not installed, or when a curves.png
    lora-cpt did not write is in the way (it is kept)."""
    try:  # a Figure without pyplot: no backend switch, nothing left open in a notebook's pyplot state
        from matplotlib.figure import Figure
    except ImportError:
        log("(install matplotlib, e.g. pip install 'lora-cpt[plot]', for curves.png)")
        return None
    run_dir = Path(run_dir)
    from lora_cpt.errors import LoraCptError
    from lora_cpt.rundir import CURVES, METRICS, REPORT, read_metrics, refuse_foreign_file, write_file_atomically

    out = run_dir / CURVES
    try:
        refuse_foreign_file(out, "curves", _curves_by_us(run_dir), "a curves.png lora-cpt drew",
                            todo="move or rename it to have the curves drawn")
    except LoraCptError as e:
        log(f"curves not drawn: {str(e).removeprefix('curves: ')}")
        return None

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
    try:
        return write_file_atomically(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png",
                                                                 metadata={"Software": PNG_MARKER}), "curves")
    except LoraCptError as e:  # a bonus: never the reason a command fails
        log(f"curves not drawn: {str(e).removeprefix('curves: ')}")
        return None
