"""`eval RUN_DIR --merged DIR`: the fidelity table against a straightforward full-logits computation."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import write_corpus, write_recipe
from lora_cpt.cli import app
from lora_cpt.data import IGNORE_INDEX
from lora_cpt.errors import LoraCptError
from lora_cpt.evaluate import load_run
from lora_cpt.fidelity import BASE, REFERENCE, _HF, fidelity, format_fidelity, score

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    """A finished 6-step run (its adapter changes the logits) and its two merges."""
    root = tmp_path_factory.mktemp("fidelity")
    corpus = write_corpus(root / "corpus")
    recipe = write_recipe(root / "recipe.yaml", tiny_model, corpus, root / "run")
    result = runner.invoke(app, ["train", str(recipe), "train.max_steps=6", "train.save_every=0",
                                 "train.eval_every=0", "train.log_every=3"])
    assert result.exit_code == 0, result.output
    merged = {}
    for weights in ("original", "dequantized"):
        out = root / f"merged-{weights}"
        result = runner.invoke(app, ["merge", str(root / "run"), "--output", str(out), "--base-weights", weights,
                                     "--dtype", "float32"])
        assert result.exit_code == 0, result.output
        merged[weights] = out
    return {"run": root / "run", "merged": merged, "root": root, "model": tiny_model, "merge_output": result.output}


@pytest.fixture(scope="module")
def loaded(run):
    return load_run(run["run"], batch_size=2)


def _straightforward(loaded, other=None, disabled=False):
    """Mean KL(base+adapter || other), top-1 agreement and the other's perplexity from whole-batch logits."""
    kls, agree, nll, count = [], 0, 0.0, 0
    model = loaded.model
    for name, blocks in loaded.sets.items():
        if name != "domain":
            continue
        for start in range(0, len(blocks), 2):
            batch = loaded.collator(list(blocks.select(range(start, min(start + 2, len(blocks))))))
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                # use_cache=False: with a cache, transformers does not detect the packed documents in position_ids
                # and attends across them
                ref = model(**inputs, use_cache=False).logits.float()
                if disabled:
                    with model.disable_adapter():
                        out = model(**inputs, use_cache=False).logits.float()
                else:
                    out = other(**inputs, use_cache=False).logits.float()
            targets = batch["labels"][:, 1:]
            keep = targets != IGNORE_INDEX
            p, q = F.log_softmax(ref[:, :-1][keep], -1), F.log_softmax(out[:, :-1][keep], -1)
            kls.append(F.kl_div(q, p, log_target=True, reduction="none").sum(-1))
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            nll -= float(q.gather(1, targets[keep][:, None]).sum())
            count += int(keep.sum())
    kl = torch.cat(kls)
    # the nearest-rank 99th percentile (numpy's inverted_cdf), the definition fidelity reports
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl.numpy(), 99, method="inverted_cdf")),
            "top1_agreement": agree / count, "ppl": math.exp(nll / count), "tokens": count}


def test_reference_and_base_rows_are_evals_perplexities_and_kl_is_the_full_logits_kl(loaded):
    table = fidelity(loaded, chunk_tokens=7, log=lambda *_: None)  # chunks smaller than a block
    plain = loaded.compare()
    for name in loaded.sets:
        assert table[REFERENCE][name]["ppl"] == pytest.approx(plain[name]["adapter"]["ppl"], rel=1e-5)
        assert table[BASE][name]["ppl"] == pytest.approx(plain[name]["base"]["ppl"], rel=1e-5)
        assert table[REFERENCE][name]["bits_per_byte"] == pytest.approx(plain[name]["adapter"]["bits_per_byte"],
                                                                         rel=1e-5)
        assert "kl_mean" not in table[REFERENCE][name]
    hand = _straightforward(loaded, disabled=True)
    got = table[BASE]["domain"]
    assert got["tokens"] == hand["tokens"]
    assert got["kl_mean"] == pytest.approx(hand["kl_mean"], rel=1e-4)
    assert got["kl_p99"] == pytest.approx(hand["kl_p99"], rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(hand["top1_agreement"])
    assert got["kl_mean"] > 1e-4  # the adapter moved the logits: the base differs (the control for the merges)
    # the chunk size does not change a number
    again = score(loaded, _HF(loaded.model, disabled=True), BASE, chunk_tokens=10_000, reference=_HF(loaded.model))
    assert again["domain"]["kl_mean"] == pytest.approx(got["kl_mean"], rel=1e-5)
    assert again["domain"]["nll"] == pytest.approx(got["nll"], rel=1e-6)


def test_merges_against_the_reference(run, loaded):
    from transformers import AutoModelForCausalLM

    table = fidelity(loaded, merged=list(run["merged"].values()), log=lambda *_: None)
    dequantized = table[str(run["merged"]["dequantized"])]["domain"]
    original = table[str(run["merged"]["original"])]["domain"]
    base = table[BASE]["domain"]
    # into the 4-bit weights the adapter was trained against, in float32: the same model up to rounding
    assert dequantized["kl_mean"] < 1e-6 and dequantized["top1_agreement"] == 1.0
    assert dequantized["ppl"] == pytest.approx(table[REFERENCE]["domain"]["ppl"], rel=1e-4)
    # into the original 16-bit weights: another model, measurably so, and still nearer than the base
    assert original["kl_mean"] > 100 * dequantized["kl_mean"]
    # the straightforward computation agrees for a merged folder too
    other = AutoModelForCausalLM.from_pretrained(str(run["merged"]["original"]), dtype=torch.float32).eval()
    hand = _straightforward(loaded, other)
    assert original["kl_mean"] == pytest.approx(hand["kl_mean"], rel=1e-4)
    assert original["ppl"] == pytest.approx(hand["ppl"], rel=1e-5)
    assert base["kl_mean"] > 0
    text = format_fidelity(table)
    assert "KL mean" in text and str(run["merged"]["original"]) in text and "domain" in text


def test_eval_command_prints_and_writes_the_table_and_merge_suggests_it(run):
    assert f"lora-cpt eval {run['run']} --merged {run['merged']['dequantized']}" in run["merge_output"]
    out = run["root"] / "fidelity.json"
    result = runner.invoke(app, ["eval", str(run["run"]), "--merged", str(run["merged"]["dequantized"]),
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "fidelity of each artifact" in result.output and "top-1" in result.output
    data = json.loads(out.read_text())
    assert set(data["fidelity"]) == {REFERENCE, BASE, str(run["merged"]["dequantized"])}
    assert data["fidelity"][BASE]["domain"]["kl_mean"] > 0


def test_a_merge_of_another_base_is_refused_in_one_line(run, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(run["merged"]["original"], foreign)
    report = json.loads((foreign / "merge_report.json").read_text())
    report["base_model"] = str(tmp_path / "another-base")
    (foreign / "merge_report.json").write_text(json.dumps(report))
    result = runner.invoke(app, ["eval", str(run["run"]), "--merged", str(foreign)])
    assert result.exit_code == 2
    assert "was merged into" in result.output and str(foreign) in result.output
    assert "Traceback" not in result.output

    reshaped = tmp_path / "reshaped"
    shutil.copytree(run["merged"]["original"], reshaped)
    (reshaped / "merge_report.json").unlink()
    config = json.loads((reshaped / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (reshaped / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["eval", str(run["run"]), "--merged", str(reshaped)])
    assert result.exit_code == 2 and "num_hidden_layers" in result.output and str(reshaped) in result.output

    for bad, words in ((tmp_path / "missing", "is not a folder"), (run["root"] / "corpus", "no config.json")):
        result = runner.invoke(app, ["eval", str(run["run"]), "--merged", str(bad)])
        assert result.exit_code == 2 and words in result.output, result.output


def test_artifacts_need_an_adapter(run):
    result = runner.invoke(app, ["eval", str(run["model"]), "--data", str(run["root"] / "corpus"),
                                 "--merged", str(run["merged"]["original"])])
    assert result.exit_code == 2 and "--adapter" in result.output


def test_fidelity_without_an_adapter_in_the_library_is_one_line(run, loaded):
    from lora_cpt.evaluate import load

    bare = load(str(run["model"]), None, [str(run["root"] / "corpus")], seq_len=64)
    with pytest.raises(LoraCptError, match="base\\+adapter"):
        fidelity(bare, merged=[run["merged"]["original"]])


def test_gguf_in_llama_cpp_against_the_reference(run, loaded, tmp_path):
    """A float32 GGUF of the dequantized merge is the reference up to llama.cpp's float32 arithmetic; q8_0 costs
    more (reported, not bounded); both are scored on the same blocks as the merged folder."""
    pytest.importorskip("llama_cpp")
    from lora_cpt.export import export_gguf

    folder = run["merged"]["dequantized"]
    f32, q8 = tmp_path / "m-f32.gguf", tmp_path / "m-q8_0.gguf"
    export_gguf(folder, f32, "f32", log=lambda *_: None)
    export_gguf(folder, q8, "q8_0", log=lambda *_: None)
    table = fidelity(loaded, merged=[folder], gguf=[f32, q8], log=lambda *_: None)
    merged, exact, quant = table[str(folder)]["domain"], table[str(f32)]["domain"], table[str(q8)]["domain"]
    assert exact["tokens"] == merged["tokens"] and exact["bytes"] == merged["bytes"]
    assert exact["kl_mean"] < 1e-6 and exact["top1_agreement"] == 1.0
    assert exact["ppl"] == pytest.approx(merged["ppl"], rel=1e-4)
    assert quant["kl_mean"] > 10 * exact["kl_mean"]  # the control: quantization is visible in the same columns
    assert math.isfinite(quant["ppl"])


def test_a_gguf_of_another_vocabulary_is_refused_in_one_line(run, tmp_path, tiny_tied_model):
    pytest.importorskip("llama_cpp")
    from helpers import save_model
    from lora_cpt.export import export_gguf

    other = save_model(tmp_path / "other", "llama", "qwen2")
    file = tmp_path / "other.gguf"
    export_gguf(other, file, "f32", log=lambda *_: None)
    result = runner.invoke(app, ["eval", str(run["run"]), "--gguf", str(file)])
    assert result.exit_code == 2 and str(file) in result.output and "vocabulary" in result.output, result.output
    assert "Traceback" not in result.output
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    result = runner.invoke(app, ["eval", str(run["run"]), "--gguf", str(not_gguf)])
    assert result.exit_code == 2 and "not a GGUF file" in result.output, result.output
