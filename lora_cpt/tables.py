"""Summary tables (rich) that the CLI prints at the end of train and merge.

The data report, the perplexity table and the memory plan have one renderer each, in plain text that reads the
same in a terminal and a log file: `lora_cpt.data.format_report`, `lora_cpt.evaluate.format_table` and
`lora_cpt.plan.format_plan`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lora_cpt.util import GB


def console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def train_table(report: dict) -> Table:
    t = report["train"]
    table = Table(title=f"run {report['run_dir']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in (("steps", f"{t['steps']:,}"), ("tokens", f"{t['tokens_seen']:,}"),
                        ("tokens/s", f"{t['tokens_per_s']:,.0f}"), ("time", f"{t['seconds']:.0f} s"),
                        ("loss", f"{t['first_loss']:.4f} -> {t['final_loss']:.4f}" if t.get("final_loss") else "-"),
                        ("trainable parameters", f"{t['trainable_parameters']:,}"),
                        ("device / dtype", f"{t['device']} / {t['compute_dtype']}")):
        table.add_row(what, value)
    return table


def merge_table(report: dict, output) -> Table:
    table = Table(title=f"merged model {output}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("base", report["base_model"]), ("base weights", report["base_weights"]), ("dtype", report["dtype"]),
            ("LoRA modules merged", str(report["modules_merged"])),
            ("tensors replaced", str(report["tensors_replaced"])),
            ("size", f"{report['total_bytes'] / GB:.2f} GB in {report['shards']} shard(s)"),
            ("time", f"{report['seconds']:.1f} s")]
    if report.get("verify"):
        v = report["verify"]
        rows.append(("worst relative error", f"{v['worst_relative_error']:.2e} (tolerance {v['tolerance']:g})"))
    if report.get("original_vs_dequantized"):
        d = report["original_vs_dequantized"]
        rows.append(("original vs 4-bit base", f"{d['mean_relative']:.2e} mean relative"))
    for what, value in rows:
        table.add_row(what, value)
    return table
