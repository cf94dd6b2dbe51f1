"""Model cards (README.md with Hugging Face YAML front matter) for merged models."""

from __future__ import annotations

import json
from pathlib import Path

from lora_cpt.rundir import REPORT
from lora_cpt.util import GB


def _front_matter(base_model: str, tags: list[str]) -> str:
    """The Hub's metadata; `base_model` only for a Hub id (the Hub takes no local path there: a local base is
    named in the card's text)."""
    from lora_cpt.hub import is_hub_id

    hub_base = [f"base_model: {json.dumps(base_model)}"] if is_hub_id(base_model) else []
    lines = ["---", *hub_base, "library_name: transformers", "tags:"]
    lines += [f"  - {t}" for t in tags]
    return "\n".join(lines + ["---", ""])


def _eval_table(results: dict) -> list[str]:
    """Perplexity per token and bits per byte (comparable across tokenizers; '-' in reports from before it)."""
    from lora_cpt.evaluate import number

    lines = ["| text | tokens | base perplexity | adapter perplexity | base bits/byte | adapter bits/byte |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in results.items():
        base, adapter = row["base"], row.get("adapter")
        lines.append(f"| {name} | {base['tokens']:,} | {number(base, 'ppl', 3)} | {number(adapter, 'ppl', 3)} | "
                     f"{number(base, 'bits_per_byte', 4)} | {number(adapter, 'bits_per_byte', 4)} |")
    return lines


def _tasks_table(tasks: dict) -> list[str]:
    """lm-evaluation-harness scores of the base and base+adapter (points for scores between 0 and 1, ± the
    standard error; the change's is paired: both models answer the same questions)."""
    from lora_cpt.forgetting import change_text, score_text

    budget = tasks.get("max_drop")
    limit = tasks.get("limit")
    lines = [f"Scored with {tasks.get('harness', 'lm-evaluation-harness')} by `lora-cpt`, the base and base+adapter "
             "being one loaded model with the adapter disabled and enabled"
             + (f"; at most {limit} examples per task" if limit else "")
             + (f"; budget: a drop of at most {budget:g} points" if budget is not None else "") + ".\n",
             "| task | metric | n | base | base+adapter | change |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    over = set(tasks.get("over_budget") or [])
    for name, r in (tasks.get("results") or {}).items():
        flag = " (over budget)" if name in over else ""
        lines.append(f"| {name} | {r['metric']} | {r.get('samples', 0):,} | "
                     f"{score_text(r.get('base'), r.get('base_stderr'), r.get('scale', 1))} | "
                     f"{score_text(r.get('adapter'), r.get('adapter_stderr'), r.get('scale', 1))} | "
                     f"{change_text(r)}{flag} |")
    return lines


def merged_model_card(report: dict, run_dir: Path | None) -> str:
    """The merged model's README.md: base, adapter, merge options, verification, data and eval."""
    out = [_front_matter(report["base_model"], ["continued-pretraining", "lora", "merged", "lora-cpt"])]
    out.append(f"# {report['base_model'].rstrip('/').split('/')[-1]} + continued pre-training (merged)\n")
    out.append(f"A LoRA adapter from continued pre-training merged into the full weights of "
               f"`{report['base_model']}` by `lora-cpt merge`. It loads as an ordinary model:\n")
    out.append("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
               "model = AutoModelForCausalLM.from_pretrained(\"PATH\")\n"
               "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")\n```\n")
    out.append("## Merge\n")
    out.append(f"- adapter: `{report['adapter']}` ({report['modules_merged']} LoRA modules, "
               f"{report['tensors_replaced']} fully trained tensors)")
    out.append(f"- base weights: `{report['base_weights']}`" + (
        " (each quantized weight round-tripped through the 4-bit quantization used in training)"
        if report["base_weights"] == "dequantized" else " (the 16-bit base weights)"))
    out.append(f"- dtype: `{report['dtype']}`; {report['shards']} safetensors shard(s), "
               f"{report['total_bytes'] / GB:.2f} GB")
    for key, value in report.get("config_changes", {}).items():
        out.append(f"- config: `{key}` set to `{value}`")
    v = report.get("verify")
    if v:
        out.append(f"- verification: {v['modules_checked']} merged modules checked against `W x + scale * B(A x)` "
                   f"on random inputs, worst relative error {v['worst_relative_error']:.2e} "
                   f"(`{v['worst_module']}`); every file read back")
    logits = report.get("logits")
    if logits:
        out.append(f"- logits: merged vs base+adapter, max abs difference {logits['max_abs_logit_diff']:.3e}")
    out.append("")
    if run_dir is not None and (Path(run_dir) / REPORT).is_file():
        run = json.loads((Path(run_dir) / REPORT).read_text())
        data = run.get("data", {}).get("train", {})
        train = run.get("train", {})
        out.append("## Training data\n")
        out.append(f"- {data.get('documents', 0):,} documents, {data.get('tokens', 0):,} tokens, sequence length "
                   f"{run.get('data', {}).get('seq_len')}")
        out.append(f"- trained {train.get('steps')} steps on {train.get('tokens_seen', 0):,} tokens "
                   f"({train.get('device')}, {train.get('compute_dtype')})\n")
        if run.get("eval"):
            out.append("## Evaluation (held-out text, token-weighted perplexity)\n")
            out += _eval_table(run["eval"])
            out.append("")
        if (run.get("tasks") or {}).get("results"):
            out.append("## Benchmarks of the adapter before merging (lm-evaluation-harness)\n")
            out += _tasks_table(run["tasks"])
            out.append("")
    return "\n".join(out) + "\n"


def adapter_model_card(report: dict, recipe: dict) -> str:
    """The adapter's README.md: a PEFT LoRA adapter from continued pre-training, with data and eval."""
    base = report["model"]
    lora, data, train = recipe["lora"], report["data"], report["train"]
    out = [_front_matter(base, ["continued-pretraining", "lora", "peft", "lora-cpt"]).replace(
        "library_name: transformers", "library_name: peft")]
    out.append(f"# LoRA adapter: continued pre-training of {base}\n")
    out.append("A PEFT LoRA adapter trained by `lora-cpt` with next-token prediction on a domain corpus. Load it "
               "with:\n")
    out.append(f"```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
               f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})\n"
               f"model = PeftModel.from_pretrained(base, \"PATH\")\n```\n")
    out.append("Merge it into full weights with `lora-cpt merge`.\n")
    out.append("## Training\n")
    out.append(f"- LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
               f"targets={lora['target_modules']}, rsLoRA={lora['rslora']}, DoRA={lora['dora']}, "
               f"embeddings={lora['embeddings']}")
    out.append(f"- base quantization: {recipe['model']['quantization']}; compute {train.get('compute_dtype')} on "
               f"{train.get('device')}")
    out.append(f"- {train['steps']} steps, {train['tokens_seen']:,} tokens, learning rate "
               f"{recipe['train']['learning_rate']}, sequence length {data['seq_len']}\n")
    out.append("## Data\n")
    t = data["train"]
    held = data.get("held_out") or {}  # (reports from before it have no held_out)
    out.append(f"- {t['documents']:,} documents, {t['tokens']:,} tokens, {t['blocks']:,} blocks; held-out split: "
               f"{data['eval_split']}" + (f", {held['tokens']:,} tokens" if held.get("tokens") else ""))
    if held.get("warning"):
        out.append(f"- warning: {held['warning']}")
    if t.get("replay_ratio_target"):
        out.append(f"- replay (general text): {t['replay_ratio_achieved']:.1%} of training tokens")
    not_trained = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in data["tokens_not_trained_on"].items() if v)
    out.append(f"- not trained on: {not_trained or 'none'}\n")
    if report.get("eval"):
        out.append("## Evaluation (held-out text, token-weighted perplexity)\n")
        out += _eval_table(report["eval"])
        out.append("")
    if (report.get("tasks") or {}).get("results"):
        out.append("## Benchmarks (lm-evaluation-harness)\n")
        out += _tasks_table(report["tasks"])
        out.append("")
    return "\n".join(out) + "\n"
