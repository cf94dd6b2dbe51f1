"""GGUF export for llama.cpp and Ollama: a model folder (a merged output, or any checkpoint of a supported
architecture in safetensors) -> one .gguf file, streamed.

    export_gguf("merged/med-llama", outtype="q8_0")          # -> merged/med-llama-q8_0.gguf (beside the folder)
    export_gguf("merged/med-llama", "med.gguf", outtype="f16", overwrite=True)

Built on the `gguf` package (llama.cpp's own Python library): tensor names from its `TensorNameMap`, the
file from its `GGUFWriter`, Q8_0 blocks from `gguf.quants`, special tokens, merges and the chat template
from `gguf.SpecialVocab`. The metadata follows llama.cpp's converter for each architecture; transformers'
GGUF reader (`from_pretrained(dir, gguf_file=...)`) is the independent check (tests/test_export.py).

Streaming like the merge: the tensor table is planned from the safetensors headers, written first, then
each tensor is read in row chunks (`safetensors_io.read_rows`), transformed, converted and appended, so
peak RAM is one chunk (16 MB of float32), not the model. The file is written beside its destination
under a temporary name and renamed into place only when complete and read back.

Layout changes llama.cpp expects (transformers' reader undoes each of them):
- llama, mistral: q_proj/k_proj rows permuted per head (llama.cpp's RoPE pairs dims (2i, 2i+1), HF's
  (i, i + d/2)); llama-3 RoPE scaling becomes a `rope_freqs` tensor;
- gemma2: every RMSNorm weight + 1 (HF computes x * (1 + w), llama.cpp x * w), soft-capping metadata;
- phi3: fused qkv_proj and gate_up_proj kept fused (attn_qkv, ffn_up); longrope factors as tensors;
- tied embeddings: no `output` tensor (llama.cpp then uses token_embd);
- 1-D tensors (norms, biases) stay float32 whatever the outtype, as llama.cpp's converter does; a 2-D
  tensor whose rows are not a multiple of 32 falls back from q8_0 to f16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lora_cpt.errors import LoraCptError
from lora_cpt.interrupt import discard, pause
from lora_cpt.rundir import OwnedDir, check_writable, read_manifest, remove_leftovers, staging_file, write_error
from lora_cpt.safetensors_io import TensorInfo, read_header, read_rows, row_chunks
from lora_cpt.util import GB, check_free_space

GGUF_MIN = "0.17.1"  # knows Qwen3, no sentencepiece pin (transformers' reader itself needs 0.10)
INSTALL_HINT = "pip install 'lora-cpt[gguf]' (or pip install 'gguf>=0.17.1')"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# model_type -> GGUF architecture (llama.cpp converts Mistral as llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                 "phi3": "phi3"}
MARKER = "lora_cpt.version"  # written second in every file, so --overwrite can tell our files from others
CHUNK_ELEMENTS = 4 * 2**20  # float32 working chunk: 16 MB
FP16_MAX = 65504.0
SKIPPED = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved

# Byte-level BPE pre-tokenizers llama.cpp implements, by the Split regex in tokenizer.json (the names are
# llama.cpp's `tokenizer.ggml.pre` values; tests/test_export.py checks them against transformers' reader)
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    _WORDS + r"|\p{N}{1,3}" + _REST: "llama-bpe",  # Llama-3: numbers in runs of up to 3 digits
    _WORDS + r"|\p{N}" + _REST: "qwen2",  # Qwen2/2.5/3: one digit at a time
}


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise LoraCptError(f"GGUF export needs the gguf package: {INSTALL_HINT}") from None
    if not hasattr(gguf.MODEL_ARCH, "QWEN3"):  # older releases lack architectures we write
        raise LoraCptError(f"GGUF export needs gguf>={GGUF_MIN}: {INSTALL_HINT}")
    return gguf


def default_output(model_dir: str | Path, outtype: str) -> Path:
    """Where the GGUF goes by default: beside the model folder, `<folder>-<outtype>.gguf` (never inside a folder
    the tool may not own; the merged folder stays a plain Hugging Face checkpoint)."""
    folder = Path(os.path.abspath(Path(model_dir).expanduser()))  # "." and "x/" name the folder; links not followed
    return folder.parent / f"{folder.name or 'model'}-{outtype}.gguf"


def _written_by_us(path: Path) -> bool:
    """Is `path` a GGUF file whose metadata carries our marker (written as the second key)?"""
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return False
            f.read(4 + 8 + 8)  # version, tensor count, key count
            for _ in range(2):
                (n,) = struct.unpack("<Q", f.read(8))
                key = f.read(n).decode("utf-8", "replace")
                (vtype,) = struct.unpack("<I", f.read(4))
                if vtype != 8:  # only strings are expected here
                    return False
                (n,) = struct.unpack("<Q", f.read(8))
                f.read(n)
                if key == MARKER:
                    return True
    except (OSError, struct.error):
        return False
    return False


def check_output(output: str | Path, overwrite: bool, key: str = "--output") -> Path:
    """The GGUF destination must be new, or (with --overwrite) a GGUF lora-cpt wrote; its folder writable."""
    output = Path(output).expanduser()
    if output.suffix != ".gguf":
        raise LoraCptError(f"{key}: '{output}' should end in .gguf")
    if output.is_dir():
        raise LoraCptError(f"{key}: '{output}' is a folder; give a file name ending in .gguf")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise LoraCptError(f"{key}: '{output}' already exists; choose another file or pass --overwrite")
        if output.is_symlink() or not _written_by_us(output):
            raise LoraCptError(f"{key}: '{output}' was not written by lora-cpt, which never overwrites files it did "
                               "not create; move it or choose another file")
    check_writable(output.parent, key)
    return output


# ---------------------------------------------------------------- reading the model


@dataclass
class Model:
    dir: Path
    config: object  # transformers config (its class defaults filled in)
    model_type: str
    arch: str
    tensors: dict[str, TensorInfo]  # checkpoint name -> where it is, in file order


def read_model(model_dir: Path) -> Model:
    if not model_dir.is_dir():
        raise LoraCptError(f"MODEL_DIR: '{model_dir}' is not a folder; give a model folder (e.g. a merged output)")
    raw_path = model_dir / "config.json"
    if not raw_path.is_file():
        from lora_cpt.rundir import ADAPTER, is_adapter_dir

        if is_adapter_dir(model_dir) or is_adapter_dir(model_dir / ADAPTER):
            raise LoraCptError(f"MODEL_DIR: '{model_dir}' is an adapter or a run directory; merge it first, with "
                               "--gguf to write the GGUF in the same step")
        raise LoraCptError(f"MODEL_DIR: '{model_dir}' has no config.json")
    try:
        model_type = json.loads(raw_path.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as e:
        raise LoraCptError(f"{raw_path}: invalid JSON ({e.msg})") from None
    if model_type not in ARCHITECTURES:
        raise LoraCptError(f"{raw_path}: model_type '{model_type}' has no GGUF export in lora-cpt; supported: "
                           f"{', '.join(ARCHITECTURES)}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        from lora_cpt.util import first_line

        raise LoraCptError(f"{raw_path}: cannot read the config ({first_line(e)})") from None
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise LoraCptError(f"MODEL_DIR: '{model_dir}' has no model.safetensors or model.safetensors.index.json "
                           "(pickle weights are refused)")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        if not (model_dir / name).is_file():
            raise LoraCptError(f"MODEL_DIR: shard '{model_dir / name}' listed in the index is missing")
        try:
            tensors.update(read_header(model_dir / name))
        except ValueError as e:
            raise LoraCptError(str(e)) from None
    return Model(model_dir, config, model_type, ARCHITECTURES[model_type], tensors)


# ---------------------------------------------------------------- the plan


@dataclass
class Planned:
    """One GGUF tensor: its name, layout (ggml order is reversed on disk) and where its values come from."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    source: TensorInfo | None = None
    values: torch.Tensor | None = None  # a computed tensor (rope factors), instead of a source
    transform: str | None = None  # permute_q | permute_k | plus_one
    group: int = 1  # rows that must stay in one chunk (a head, for the permutation)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _nbytes(gguf, qtype, numel: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return numel // block * size


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _rope(c) -> dict:
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if "rope_type" not in rope:  # transformers < 5 configs
        rope.update(getattr(c, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """Llama-3 RoPE scaling as llama.cpp takes it: one divisor per frequency (the `rope_freqs` tensor)."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def plan_tensors(gguf, model: Model, outtype: str) -> tuple[list[Planned], list[str]]:
    c, arch = model.config, model.arch
    gguf_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(gguf_arch, c.num_hidden_layers)
    Q = gguf.GGMLQuantizationType
    want = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    tied = bool(getattr(c, "tie_word_embeddings", False))
    heads, hd = c.num_attention_heads, _head_dim(c)
    planned, notes = [], []
    for key, info in model.tensors.items():
        if key.endswith(SKIPPED) or (tied and key == "lm_head.weight"):
            continue
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LoraCptError(f"{model.dir}: tensor '{key}' has no GGUF name for {arch}; is this a standard "
                               f"{model.model_type} checkpoint?")
        if not info.dtype.is_floating_point:
            raise LoraCptError(f"{model.dir}: tensor '{key}' is {info.dtype}; export a full-precision checkpoint "
                               "(a merged output), not a quantized one")
        p = Planned(name, info.shape, Q.F32 if len(info.shape) < 2 else want, info)
        if p.qtype == Q.Q8_0 and info.shape[-1] % 32:
            p.qtype = Q.F16
            notes.append(f"{name}: rows of {info.shape[-1]} are not a multiple of 32, written as f16")
        if model.model_type in ("llama", "mistral") and key.endswith(("q_proj.weight", "q_proj.bias")):
            p.transform, p.group = "permute_q", hd
        elif model.model_type in ("llama", "mistral") and key.endswith(("k_proj.weight", "k_proj.bias")):
            p.transform, p.group = "permute_k", hd
        elif model.model_type == "gemma2" and key.endswith("norm.weight"):
            p.transform = "plus_one"
        planned.append(p)
    names = {p.name for p in planned}
    if "token_embd.weight" not in names:
        raise LoraCptError(f"{model.dir}: no input embedding (model.embed_tokens.weight) in the checkpoint")
    if not tied and "output.weight" not in names:
        raise LoraCptError(f"{model.dir}: config.json says the embeddings are not tied but the checkpoint has no "
                           "lm_head.weight")
    if model.model_type == "mistral" and (c.sliding_window or 0) and c.sliding_window < c.max_position_embeddings:
        notes.append(f"llama.cpp runs Mistral as llama, without its sliding window: the same model up to "
                     f"{c.sliding_window} tokens of context")
    scalar = getattr(c, "query_pre_attn_scalar", None)
    if model.model_type == "gemma2" and scalar not in (hd, c.hidden_size // heads):
        notes.append(f"llama.cpp scales Gemma-2 attention by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B); "
                     f"this config's query_pre_attn_scalar is {scalar}")
    rope = _rope(c)
    kind = rope.get("rope_type", "default")
    if kind == "llama3" and arch == "llama":
        planned.append(Planned("rope_freqs.weight", (hd // 2,), Q.F32, values=llama3_rope_factors(rope, hd)))
    elif kind == "longrope" and arch == "phi3":
        rot = int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // heads
        for which in ("long", "short"):
            factors = torch.tensor(rope[f"{which}_factor"], dtype=torch.float32)
            if factors.numel() != rot // 2:
                raise LoraCptError(f"config.json: rope {which}_factor has {factors.numel()} values, expected "
                                   f"{rot // 2}")
            planned.append(Planned(f"rope_factors_{which}.weight", (rot // 2,), Q.F32, values=factors))
    elif kind not in ("default", "linear", "yarn"):
        raise LoraCptError(f"config.json: RoPE scaling '{kind}' has no GGUF form lora-cpt writes for "
                           f"{model.model_type} (supported: linear, yarn; llama3 for llama; longrope for phi3)")
    return planned, notes


# ---------------------------------------------------------------- metadata


def write_metadata(gguf, w, model: Model, outtype: str, name: str, n_vocab: int) -> None:
    from lora_cpt import __version__

    c, arch = model.config, model.arch
    w.add_string(MARKER, __version__)
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    heads = c.num_attention_heads
    hd = _head_dim(c)
    rope = _rope(c)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(c.num_key_value_heads or heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_vocab_size(n_vocab)
    if hd != c.hidden_size // heads or arch in ("qwen3", "gemma2"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings")
        if original:
            w.add_rope_scaling_orig_ctx_len(int(original))
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    elif arch == "gemma2":
        if c.attn_logit_softcapping is not None:
            w.add_attn_logit_softcapping(float(c.attn_logit_softcapping))
        if c.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(float(c.final_logit_softcapping))
        w.add_sliding_window(int(c.sliding_window or 0))
    elif arch == "phi3":
        rot = int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // heads
        original = getattr(c, "original_max_position_embeddings", None) or c.max_position_embeddings
        w.add_rope_dimension_count(rot)
        w.add_rope_scaling_orig_ctx_len(int(original))
        w.add_sliding_window(int(c.sliding_window or 0))  # 0 tells llama.cpp it is not Phi-4's sliding window
        if kind == "longrope":
            scale = c.max_position_embeddings / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)


# ---------------------------------------------------------------- the tokenizer


def _split_regexes(node) -> list[str]:
    if not isinstance(node, dict):
        return []
    found = [node["pattern"]["Regex"]] if node.get("type") == "Split" and "Regex" in (node.get("pattern") or {}) else []
    for sub in node.get("pretokenizers") or []:
        found += _split_regexes(sub)
    return found


def _find(node, kind: str) -> dict | None:
    """The first pre-tokenizer or normalizer of this type in a tokenizer.json node (Sequences searched)."""
    if not isinstance(node, dict):
        return None
    if node.get("type") == kind:
        return node
    for sub in node.get("pretokenizers") or node.get("normalizers") or []:
        if (found := _find(sub, kind)) is not None:
            return found
    return None


def _adds_bos_eos(folder: Path, tok: dict) -> dict[str, bool]:
    """Does encoding add BOS / EOS: tokenizer_config.json's add_bos_token/add_eos_token when set, else what the
    post-processor template of tokenizer.json does."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = {}

    def content(name):
        value = config.get(f"{name}_token")
        return value.get("content") if isinstance(value, dict) else value

    def template(node) -> list:
        if not isinstance(node, dict):
            return []
        if node.get("type") == "TemplateProcessing":
            return [item.get("SpecialToken", {}).get("id") for item in node.get("single") or []]
        return next((t for sub in node.get("processors") or [] if (t := template(sub))), [])

    single = template(tok.get("post_processor"))
    out = {}
    for name, position in (("bos", 0), ("eos", -1)):
        flag = config.get(f"add_{name}_token")
        if not isinstance(flag, bool):
            flag = bool(single) and single[position] is not None and content(name) in (None, single[position])
        out[name] = flag
    return out


def _chat_template(folder: Path):
    """The chat template: tokenizer_config.json's, else chat_template.jinja (transformers 5), else .json's."""
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, json.JSONDecodeError):
        template = None
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return template if isinstance(template, (str, list)) else None


def write_vocab(gguf, w, model: Model, n_vocab: int) -> dict:
    """Tokens, their types and scores, merges, special token ids, add_bos/eos and the chat template."""
    path = model.dir / "tokenizer.json"
    if not path.is_file():
        hint = " (only tokenizer.model: save the tokenizer with transformers to get one)" \
            if (model.dir / "tokenizer.model").is_file() else ""
        raise LoraCptError(f"MODEL_DIR: '{model.dir}' has no tokenizer.json{hint}; the GGUF needs the vocabulary")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LoraCptError(f"{path}: invalid JSON ({e.msg})") from None
    bpe = tok.get("model") or {}
    if bpe.get("type") != "BPE":
        raise LoraCptError(f"{path}: a {bpe.get('type')} tokenizer; GGUF export supports BPE tokenizers (byte-level "
                           "like GPT-2/Llama-3/Qwen, or SentencePiece-style with byte fallback like Llama-2/Mistral/"
                           "Gemma/Phi-3)")
    spm = bool(bpe.get("byte_fallback"))
    pre, dec = tok.get("pre_tokenizer"), tok.get("decoder")
    if not spm and not (_find(pre, "ByteLevel") or _find(dec, "ByteLevel")):
        raise LoraCptError(f"{path}: a BPE tokenizer that is neither byte-level nor byte-fallback; llama.cpp cannot "
                           "reproduce it")
    T = gguf.TokenType
    vocab: dict[str, int] = bpe["vocab"]
    added = {a["id"]: a for a in tok.get("added_tokens") or []}
    largest = max([*vocab.values(), *added])
    if largest >= n_vocab:
        raise LoraCptError(f"{path}: the tokenizer has token id {largest} but the embedding has {n_vocab} rows; "
                           "resize the model's embeddings to the tokenizer (resize_token_embeddings) before exporting")
    tokens: list[str] = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [T.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, T.NORMAL
    scores = [0.0] * n_vocab
    # "a b" strings (a space inside a part written as U+0120, as gguf's SpecialVocab does)
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m)
              for m in bpe.get("merges") or []]
    if spm:  # llama.cpp's SentencePiece tokenizer merges the best-scored pair first: the BPE merge order
        scores = [-1000.0 if t == T.UNUSED else 0.0 for t in types]
        for rank, merge in enumerate(merges):
            i = vocab.get(merge.replace(" ", "", 1))
            if i is not None and scores[i] == 0.0:
                scores[i] = -1.0 - rank
        for text, i in vocab.items():
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = T.BYTE
    user_defined = 0
    for i, a in added.items():
        if a.get("special"):
            tokens[i], types[i] = a["content"], T.CONTROL
        else:  # a domain token added in training: llama.cpp matches it whole, in raw text (spaces, not "▁")
            tokens[i], types[i] = a["content"].replace("\u2581", " ") if spm else a["content"], T.USER_DEFINED
            user_defined += 1
        if spm:
            scores[i] = -1000.0
    if spm and bpe.get("unk_token") in vocab:
        types[vocab[bpe["unk_token"]]] = T.UNKNOWN
    info = {"model": "llama" if spm else "gpt2", "tokens": n_vocab, "added_tokens": user_defined}
    w.add_tokenizer_model(info["model"])
    if spm:
        info["pre"] = "default"
        metaspace = _find(pre, "Metaspace")  # Llama/Mistral: "▁" prepended by the pre-tokenizer
        prepend = metaspace.get("prepend_scheme", "always") != "never" if metaspace else \
            _find(tok.get("normalizer"), "Prepend") is not None  # Phi-3 (legacy Llama): by the normalizer; Gemma: none
        w.add_add_space_prefix(prepend)
    else:
        regexes = _split_regexes(pre)
        known = [PRE_TOKENIZERS[r] for r in regexes if r in PRE_TOKENIZERS]
        if known:
            info["pre"] = known[0]
        else:
            info["pre"] = "gpt-2"
            if regexes or not (_find(pre, "ByteLevel") or {}).get("use_regex", True):
                info["warning"] = ("the tokenizer's pre-tokenizer split is not one llama.cpp knows; it will split "
                                   "text the GPT-2 way and may tokenize some strings differently")
    w.add_tokenizer_pre(info["pre"])
    w.add_token_list(tokens)
    if spm:
        w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    quiet = logging.getLogger("gguf.vocab")  # its warnings about unusual pair templates would clutter our output
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(model.dir, load_merges=True, n_vocab=n_vocab)
        # explicit, as gguf releases differ here: BOS/EOS flags, the chat template (transformers 5 keeps it in
        # chat_template.jinja) and the merges
        special.add_special_token.update(_adds_bos_eos(model.dir, tok))
        special.chat_template = special.chat_template or _chat_template(model.dir)
        special.merges = special.merges or merges
        special.add_to_gguf(w, quiet=True)
    finally:
        quiet.setLevel(level)
    info["merges"] = len(special.merges)
    info["special"] = dict(special.special_token_ids)
    info["chat_template"] = special.chat_template is not None
    return info


# ---------------------------------------------------------------- writing


def _permute(x: torch.Tensor, group: int) -> torch.Tensor:
    """llama.cpp's RoPE row order within each head: rows (i, i + d/2) of HF become (2i, 2i + 1)."""
    heads = x.shape[0] // group
    return x.reshape(heads, 2, group // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _chunks(p: Planned):
    """The tensor's values in float32 row chunks, with its layout transform applied."""
    if p.values is not None:
        yield p.values.float()
        return
    info = p.source
    rows_per_chunk = max(p.group, (CHUNK_ELEMENTS // max(info.row_numel, 1)) // p.group * p.group)
    for start, stop in row_chunks(info.rows, info.row_numel, rows_per_chunk * max(info.row_numel, 1)):
        try:
            x = read_rows(info, start, stop).float()
        except ValueError as e:  # a truncated shard
            raise LoraCptError(str(e)) from None
        if p.transform in ("permute_q", "permute_k"):
            x = _permute(x, p.group)
        elif p.transform == "plus_one":
            x = x + 1.0
        yield x


def _encode(gguf, p: Planned, x: torch.Tensor) -> np.ndarray:
    """A float32 chunk as the bytes of the tensor's GGUF type (a flat uint8 array)."""
    Q = gguf.GGMLQuantizationType
    if p.qtype == Q.Q8_0:
        return gguf.quants.quantize(x.reshape(-1, p.shape[-1]).numpy(), Q.Q8_0).reshape(-1)
    if p.qtype == Q.F16:
        low, high = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
        if max(-low, high) > FP16_MAX:
            raise LoraCptError(f"tensor '{p.name}' has values beyond float16's range (|x| up to "
                               f"{max(-low, high):.3g}); use --outtype bf16, f32 or q8_0")
        x = x.to(torch.float16)
    elif p.qtype == Q.BF16:
        x = x.to(torch.bfloat16)
    return x.contiguous().reshape(-1).view(torch.uint8).numpy()


class _Appender:
    """Appends to the open file through a BackgroundWriter (disk writes overlap the conversion); keeps its own
    position for the alignment padding GGUF puts before every tensor."""

    def __init__(self, f, alignment: int):
        from lora_cpt.safetensors_io import BackgroundWriter

        self.alignment, self.pos = alignment, f.tell()
        self.writer = BackgroundWriter(f)

    def write(self, data) -> None:
        self.writer.put(data)
        self.pos += len(data) if isinstance(data, bytes) else data.nbytes

    def align(self) -> None:
        pad = -self.pos % self.alignment
        if pad:
            self.write(bytes(pad))

    def close(self) -> None:
        self.writer.finish()


def _fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ExportResult:
    output: Path
    report: dict = field(default_factory=dict)


def _holds_output(export_fn):
    """`export_gguf` holds the GGUF file's lock (lock.py) from its first check until the file is in place: a second
    export to the same file is refused at once, naming this one."""
    import functools

    @functools.wraps(export_fn)
    def wrapper(model_dir, output=None, outtype="f16", *args, **kwargs):
        from lora_cpt.lock import hold_beside

        with hold_beside(output if output is not None else default_output(model_dir, outtype), "--output"):
            return export_fn(model_dir, output, outtype, *args, **kwargs)

    return wrapper


def _staged_by_us(path: Path) -> bool:
    """A staging file of a killed export: empty (killed before the header) or a GGUF with our marker."""
    try:
        return path.stat().st_size == 0 or _written_by_us(path)
    except OSError:
        return False


@_holds_output
def export_gguf(model_dir: str | Path, output: str | Path | None = None, outtype: str = "f16",
                overwrite: bool = False, log=print) -> ExportResult:
    """Write `model_dir` (safetensors, config.json, tokenizer.json) as one GGUF file for llama.cpp and Ollama."""
    started = time.perf_counter()
    if outtype not in OUTTYPES:
        raise LoraCptError(f"--outtype: expected {', '.join(OUTTYPES)}, got '{outtype}'")
    gguf = require_gguf()
    model_dir = Path(model_dir).expanduser()
    output = check_output(output if output is not None else default_output(model_dir, outtype), overwrite)
    for leftover in remove_leftovers(output, ours=_staged_by_us):  # of an export that was killed
        log(f"removed {leftover}, left by an interrupted export")
    model = read_model(model_dir)
    planned, notes = plan_tensors(gguf, model, outtype)
    total = sum(_nbytes(gguf, p.qtype, p.numel) for p in planned)
    check_free_space(output.parent, total, "the GGUF")
    n_vocab = next(p.shape[0] for p in planned if p.name == "token_embd.weight")
    log(f"exporting {model_dir} ({model.model_type}) to GGUF {outtype}: {len(planned)} tensors, "
        f"{total / GB:.2f} GB -> {output}")
    manifest = read_manifest(output.parent)
    if manifest is not None:  # a folder lora-cpt owns (a merged model): record the file before writing it
        OwnedDir(output.parent, manifest.get("kind", ""), "--output").add(output.name)
    writer = None
    tmp = staging_file(output)
    try:
        writer = gguf.GGUFWriter(tmp, model.arch)
        write_metadata(gguf, writer, model, outtype, Path(os.path.abspath(model_dir)).name, n_vocab)
        vocab = write_vocab(gguf, writer, model, n_vocab)
        for p in planned:  # the tensor table first: names, shapes, types, offsets
            writer.add_tensor_info(p.name, p.shape, np.float32, _nbytes(gguf, p.qtype, p.numel), raw_dtype=p.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        pause("export")  # a test hook (interrupt.py); nothing without its variable
        fout = writer.fout[0]
        out = _Appender(fout, writer.data_alignment)
        prints = {}
        from lora_cpt.progress import progress

        bar = progress(total=total, unit="B", unit_scale=True, desc="writing GGUF")
        try:
            for p in planned:  # then the data, tensor by tensor, chunk by chunk
                out.align()
                first = last = None
                size = 0
                for x in _chunks(p):
                    data = _encode(gguf, p, x)
                    out.write(data)
                    size += data.nbytes
                    first = first if first is not None else data[:64].tobytes()
                    last = ((last or b"") + data[-64:].tobytes())[-64:]
                    bar.update(data.nbytes)
                if size != _nbytes(gguf, p.qtype, p.numel):
                    raise LoraCptError(f"internal error: tensor '{p.name}' wrote {size} bytes, planned "
                                       f"{_nbytes(gguf, p.qtype, p.numel)}")
                prints[p.name] = _fingerprint((first or b"") + (last or b""))
            out.align()
        finally:
            out.close()
            bar.close()
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        writer = None
        _read_back(gguf, tmp, planned, prints)
        os.replace(tmp, output)
    except BaseException as e:
        if writer is not None:
            writer.close()
        discard(tmp)
        if isinstance(e, OSError):
            raise write_error("--output", output, e) from None
        raise
    seconds = time.perf_counter() - started
    report = {"output": str(output), "model_type": model.model_type, "architecture": model.arch, "outtype": outtype,
              "tensors": len(planned), "bytes": output.stat().st_size, "tokenizer": vocab, "notes": notes,
              "seconds": round(seconds, 2)}
    t = vocab
    log(f"tokenizer: {t['model']} (pre {t['pre']}), {t['tokens']} tokens, {t['merges']} merges, "
        f"{t['added_tokens']} added tokens{', chat template' if t['chat_template'] else ''}")
    for note in ([t["warning"]] if "warning" in t else []) + notes[:5]:
        log(f"note: {note}")
    log(f"GGUF written to {output} ({report['bytes'] / GB:.2f} GB) in {seconds:.1f}s")
    return ExportResult(output, report)


_FIXED = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes


def tensor_table(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], int, int]], int]:
    """({name: (shape in torch order, ggml type, offset)}, data start) parsed from a GGUF file's header. A small
    parser of its own (gguf's GGUFReader builds Python objects for every token and merge: seconds per file)."""
    import mmap

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        def take(fmt: str, at: int):
            return struct.unpack_from(fmt, m, at), at + struct.calcsize(fmt)

        (magic, version, n_tensors, n_kv), pos = take("<4sIQQ", 0)
        if magic != b"GGUF":
            raise LoraCptError(f"verification: {path} is not a GGUF file")
        alignment = 32
        for _ in range(n_kv):
            (n,), pos = take("<Q", pos)
            key = bytes(m[pos:pos + n]).decode()
            (vtype,), pos = take("<I", pos + n)
            if vtype == 9:  # array: element type, count, elements
                (etype, count), pos = take("<IQ", pos)
            else:
                etype, count = vtype, None
            for _ in range(1 if count is None else count):
                if etype == 8:
                    (n,), pos = take("<Q", pos)
                    pos += n
                else:
                    if key == "general.alignment":
                        alignment = struct.unpack_from("<I", m, pos)[0]
                    pos += _FIXED[etype]
        table = {}
        for _ in range(n_tensors):
            (n,), pos = take("<Q", pos)
            name = bytes(m[pos:pos + n]).decode()
            (n_dims,), pos = take("<I", pos + n)
            dims, pos = take(f"<{n_dims}Q", pos)
            (qtype, offset), pos = take("<IQ", pos)
            table[name] = (tuple(reversed(dims)), qtype, offset)
    return table, (pos + alignment - 1) // alignment * alignment


def _read_back(gguf, path: Path, planned: list[Planned], prints: dict) -> None:
    """Parse the written file: every tensor's name, shape, type, and its first and last bytes where its offset says."""
    table, start = tensor_table(path)
    if set(table) != {p.name for p in planned}:
        raise LoraCptError(f"verification: {path} holds {sorted(set(table) ^ {p.name for p in planned})[:3]} "
                           "unexpectedly")
    with path.open("rb") as f:
        for p in planned:
            shape, qtype, offset = table[p.name]
            size = _nbytes(gguf, p.qtype, p.numel)
            f.seek(start + offset)
            head = f.read(min(64, size))
            f.seek(start + offset + size - min(64, size))
            tail = f.read(min(64, size))
            if qtype != int(p.qtype) or shape != tuple(p.shape) or _fingerprint(head + tail) != prints[p.name]:
                raise LoraCptError(f"verification: tensor '{p.name}' does not read back as written")
