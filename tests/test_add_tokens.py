"""model.add_tokens: recipe key, tokenizer + embedding extension (mean of pieces), trainable token rows only,
merge into a resized vocabulary (checked against PEFT), plan and resume."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_recipe
from lora_cpt.config import load_recipe, read_terms, recipe_to_dict
from lora_cpt.errors import LoraCptError
from lora_cpt.model import extend_tokenizer, extend_vocabulary, is_tied, load_base

TERMS = ["syntax tree", "byte code", "compiler", "The"]  # "The" is one token already
NEW = TERMS[:3]


def quiet(*_):
    pass


# ---------------------------------------------------------------- the recipe key


def test_terms_from_list_and_file(tmp_path, monkeypatch):
    r = load_recipe(None, ["model.add_tokens=[syntax tree, ' byte code ']"])
    assert read_terms(r.model.add_tokens) == ["syntax tree", "byte code"]
    (tmp_path / "tokens.txt").write_text("# domain terms\nsyntax tree\n\n  byte code  \n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # a relative path is read from the current directory
    r = load_recipe(None, ["model.add_tokens=tokens.txt"])
    assert r.model.add_tokens == "tokens.txt" and read_terms(r.model.add_tokens) == ["syntax tree", "byte code"]
    assert load_recipe(None).model.add_tokens == []


@pytest.mark.parametrize("value, message", [
    ("missing.txt", "token file 'missing.txt' does not exist"),
    ("[a, '  ']", r"model.add_tokens\[1\]: an empty term"),
    ("[a, b, a]", r"model.add_tokens\[2\]: 'a' is listed twice \(first at model.add_tokens\[0\]\)"),
])
def test_bad_terms(tmp_path, monkeypatch, value, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraCptError, match=message):
        load_recipe(None, [f"model.add_tokens={value}"])


def test_duplicate_and_empty_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("dup.txt").write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(LoraCptError, match="dup.txt line 3: 'a' is listed twice"):
        load_recipe(None, ["model.add_tokens=dup.txt"])
    Path("none.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(LoraCptError, match="holds no terms"):
        load_recipe(None, ["model.add_tokens=none.txt"])


def test_lora_on_embeddings_refused():
    with pytest.raises(LoraCptError, match="lora.embeddings=none"):
        load_recipe(None, ["model.add_tokens=[a]", "lora.embeddings=lora"])


def test_resume_refuses_a_changed_list():
    from lora_cpt.resilience import recipe_changes

    old = recipe_to_dict(load_recipe(None, ["model.add_tokens=[a, b]"]))
    new = recipe_to_dict(load_recipe(None, ["model.add_tokens=[a, c]"]))
    assert any(c.startswith("model.add_tokens") for c in recipe_changes(old, new))
    assert recipe_changes(old, old) == []


# ---------------------------------------------------------------- tokenizer and embeddings


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_are_the_mean_of_their_pieces(tied, tiny_model, tiny_tied_model):
    base = tiny_tied_model if tied else tiny_model
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in NEW}
    ext = extend_tokenizer(tokenizer, TERMS, log=quiet)
    assert ext.terms == NEW and list(ext.skipped) == ["The"] and ext.ids == [384, 385, 386]
    for term, new_id in zip(NEW, ext.ids):  # a planted term is now one token, also inside text
        assert tokenizer(f"the {term} is", add_special_tokens=False)["input_ids"].count(new_id) == 1

    original = load_file(str(base / "model.safetensors"))
    model = load_base(str(base), quantization="nf4", compute_dtype="float32", device="cpu")
    extend_vocabulary(model, ext, len(tokenizer))
    assert (ext.rows_before, ext.rows) == (384, 448) and ext.trainable_rows == list(range(384, 448))
    assert is_tied(model) == tied and model.config.vocab_size == 448
    pairs = [(model.get_input_embeddings().weight, original["model.embed_tokens.weight"])]
    if not tied:
        pairs.append((model.get_output_embeddings().weight, original["lm_head.weight"]))
    for weight, before in pairs:
        assert weight.shape == (448, 64)
        assert torch.equal(weight[:384], before)  # the old rows are untouched
        for term, new_id in zip(NEW, ext.ids):
            expected = before[pieces[term]].float().mean(0)
            assert torch.equal(weight[new_id], expected), term  # exactly, not random, not the global mean
        assert torch.equal(weight[387:], before.float().mean(0).expand(448 - 387, -1))  # padding rows


def test_cache_key_includes_the_extended_tokenizer(tiny_model, corpus):
    from lora_cpt.data import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    plain = prepare_data(tokenizer, [str(corpus)], 64, log=quiet).report["cache"]["key"]
    extend_tokenizer(tokenizer, NEW, log=quiet)
    extended = prepare_data(tokenizer, [str(corpus)], 64, log=quiet).report["cache"]["key"]
    assert plain != extended


def test_plan_counts_new_rows(tiny_model, tmp_path):
    from lora_cpt.plan import plan_recipe

    base = load_recipe(None, [f"model.name_or_path={tiny_model}", "data.seq_len=128"])
    more = load_recipe(None, [f"model.name_or_path={tiny_model}", "data.seq_len=128", f"model.add_tokens={NEW}"])
    p0, p1 = plan_recipe(base)["plan"], plan_recipe(more)["plan"]
    assert p0.shape.vocab == 384 and p1.shape.vocab == 448  # padded to 64
    assert p1.shape.embed_params - p0.shape.embed_params == 2 * 64 * 64  # untied: embedding and head grow
    rows = p1.components["new token rows (trainable)"]
    assert rows == 64 * 64 * (4 + 4 + 8) * 2 + 448 * 64 * 2  # rows + grads + fused AdamW, per matrix; PEFT's copy
    assert p1.total > p0.total + rows


# ---------------------------------------------------------------- train, load, merge


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def trained(request, tmp_path_factory):
    from conftest import DOMAIN_DOCS, save_tiny_llama
    from lora_cpt.train import train

    tmp = tmp_path_factory.mktemp("add-tokens")
    base = save_tiny_llama(tmp / "base", tie=request.param, seed=int(request.param))
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(DOMAIN_DOCS):
        (corpus / f"doc{i:02d}.md").write_text(text, encoding="utf-8")
    recipe = write_recipe(tmp / "recipe.yaml", base, corpus, tmp / "run")
    overrides = [f"model.add_tokens={TERMS}", "train.max_steps=4", "train.save_every=0", "train.eval_every=0",
                 f"data.cache_dir={tmp / 'cache'}"]
    train(load_recipe(recipe, overrides), log=quiet)
    return base, tmp / "run", request.param


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_loads_in_plain_peft_and_only_new_rows_trained(trained):
    from peft import PeftModel

    base, run, tied = trained
    adapter = run / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))  # the extended tokenizer travels with the adapter
    assert len(tokenizer) == 387 and tokenizer.convert_tokens_to_ids("syntax tree") == 384
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    token_keys = sorted(k for k in saved if "trainable_tokens_delta" in k)
    assert len(token_keys) == (1 if tied else 2)  # a tied head uses the embedding's rows
    assert not any("base_layer" in k or "original_module" in k for k in saved)  # no full matrices saved

    original = load_file(str(base / "model.safetensors"))
    init = original["model.embed_tokens.weight"].float()
    rows = saved[next(k for k in token_keys if "embed_tokens" in k)]
    assert rows.shape == (64, 64)
    piece_mean = init[AutoTokenizer.from_pretrained(str(base))("syntax tree", add_special_tokens=False)
                      ["input_ids"]].mean(0)
    assert not torch.equal(rows[0], piece_mean)  # the new token's row trained
    if not tied:  # padding rows are never inputs: unchanged (tied, they train as head rows)
        assert torch.equal(rows[3:], init.mean(0).expand(61, -1))

    from lora_cpt.model import load_adapter  # lora-cpt's own loader resizes the base itself (eval RUN_DIR)

    ours = load_adapter(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), adapter).eval()
    ids = torch.tensor([tokenizer("the syntax tree and byte code of the compiler")["input_ids"]])
    assert ids.max() >= 384
    torch.testing.assert_close(_logits(ours, ids), _logits(peft_model, ids), rtol=0, atol=0)


def test_merge_writes_the_resized_vocabulary(trained, tmp_path):
    from peft import PeftModel

    from lora_cpt.merge import merge_adapter

    base, run, tied = trained
    result = merge_adapter(run, tmp_path / "merged", dtype="float32", log=quiet)
    merged_dir = tmp_path / "merged"
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    assert merged.config.vocab_size == 448 and result.report["config_changes"]["vocab_size"] == 448
    assert tokenizer("a syntax tree", add_special_tokens=False)["input_ids"].count(384) == 1
    assert is_tied(merged) == tied and merged.config.tie_word_embeddings == tied
    written = load_file(str(merged_dir / "model.safetensors"))
    assert ("lm_head.weight" in written) != tied  # tied: one matrix
    original = load_file(str(base / "model.safetensors"))
    for key in ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"]):
        assert torch.equal(written[key][:384], original[key])  # only the new rows differ from the base

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    peft_model = PeftModel.from_pretrained(model, str(run / "adapter")).eval()
    ids = torch.tensor([tokenizer("the syntax tree and byte code of the compiler. Rule 3")["input_ids"]])
    want = _logits(peft_model, ids)
    reference = peft_model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), _logits(reference.eval(), ids), rtol=0, atol=1e-4)
    torch.testing.assert_close(_logits(merged, ids), want, rtol=0, atol=1e-4)
