"""Load a causal LM as a quantized base and put LoRA adapters on it.

    model = load_base("meta-llama/Llama-3.1-8B", quantization="nf4")
    model = add_lora(model, r=16, alpha=32, embeddings="none")
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cpt.errors import LoraCptError
from lora_cpt.rundir import ADAPTER_CONFIG, is_adapter_dir
from lora_cpt.util import DTYPE_NAMES, dtype_named, first_line



def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraCptError("train.device: 'cuda' was asked for but no CUDA GPU is visible; use device=auto or cpu")
    return device


def native_bf16() -> bool:
    """Is this GPU Ampere (sm_80) or newer: bfloat16 in hardware, and flex_attention's kernels?

    `torch.cuda.is_bf16_supported()` also counts emulation and answers True on a T4 (sm_75), where
    bf16 runs several times slower than fp16."""
    major, _minor = torch.cuda.get_device_capability()
    return major >= 8


def resolve_compute_dtype(name: str, device: str) -> torch.dtype:
    """auto: bf16 on GPUs that have it natively, fp16 on those that don't (T4, V100), fp32 on CPU
    (bf16 matmuls are slow on many CPUs)."""
    if name != "auto":
        dtype = dtype_named(name)
        if dtype is None:
            raise LoraCptError(f"model.compute_dtype: expected auto, {', '.join(DTYPE_NAMES)}; got {name!r}")
        if dtype == torch.bfloat16 and device == "cuda" and not native_bf16():
            raise LoraCptError("model.compute_dtype: this GPU has no native bfloat16 (it would be emulated, several "
                               "times slower); use float16 or auto")
        return dtype
    if device == "cuda":
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.float32


def resolve_attention(name: str | None, device: str, document_masking: bool = True) -> str | None:
    """The attention implementation to load the model with (None: transformers' default, sdpa).

    auto (or unset): flex_attention on Ampere-or-newer GPUs when packed documents are kept apart. With
    per-document position_ids transformers gives sdpa a dense [batch, 1, L, L] mask (1 GB at 32K tokens,
    4 GB at 64K) and sdpa then cannot use its flash kernel; flex_attention gets a block mask of
    ~L²/16384 bytes and skips the blocks between documents (measured in docs/benchmarks.md: faster from
    8K tokens on, and twice the context on a 24 GB card). Elsewhere (CPU, T4/V100, no document masking,
    where sdpa needs no mask) transformers' default."""
    if name not in (None, "auto"):
        return name
    if device == "cuda" and document_masking and torch.cuda.is_available():
        import importlib.util

        if native_bf16() and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:  # torch >= 2.5
            return "flex_attention"
    return None


def _device_map(device: str):
    if device == "cuda":
        return {"": int(os.environ.get("LOCAL_RANK", 0))}  # one full copy per process under DDP
    if device == "meta":  # structure only: transformers builds the (quantized) modules and reads no weights
        return {"": "meta"}
    return {"": "cpu"}


def check_model_path(name_or_path: str, key: str = "model.name_or_path", need_config: bool = True) -> str:
    """Fail at once, naming the key, if the model can be neither a local folder nor loaded from the Hub now
    (see lora_cpt.hub.resolve_model); returns the name to load."""
    from lora_cpt.hub import resolve_model

    return resolve_model(name_or_path, key, need_config)


def check_local_model(name_or_path: str) -> None:
    """A local model folder's config.json, index and safetensors headers hold together (a damaged one is named
    in one line; transformers would raise a traceback without the file's name)."""
    if Path(name_or_path).is_dir():
        from lora_cpt.integrity import check_model_dir

        check_model_dir(name_or_path)


def _load_error(name_or_path: str, e: Exception, key: str) -> LoraCptError:
    from lora_cpt.hub import hub_error

    return hub_error(name_or_path, e, key)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, key: str = "model.name_or_path"):
    from transformers import AutoTokenizer

    from lora_cpt.hub import local_files_only

    name_or_path = check_model_path(name_or_path, key, need_config=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_files_only(name_or_path))
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e, key) from None
    return tokenizer


def quantization_config(quantization: str, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None):
    """quant_storage: the dtype the packed 4-bit weights are stored as (bitsandbytes' default uint8). FSDP shards
    them only when it is a floating dtype (lora_cpt.fsdp stores them in the compute dtype)."""
    from transformers import BitsAndBytesConfig

    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=quant_storage or torch.uint8)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def model_positions(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """The model's maximum positions from its config (no weights), or None if it does not say."""
    from transformers import AutoConfig

    from lora_cpt.hub import local_files_only

    name_or_path = check_model_path(name_or_path)
    check_local_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                            local_files_only=local_files_only(name_or_path))
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e, "model.name_or_path") from None
    config = getattr(config, "get_text_config", lambda: config)()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(name_or_path: str, seq_len: int, key: str = "data.seq_len",
                  trust_remote_code: bool = False) -> int | None:
    """The model's positions (None if its config does not say); a one-line error naming `key` if seq_len is
    longer than that."""
    positions = model_positions(name_or_path, trust_remote_code)
    if positions is not None and seq_len > positions:
        raise LoraCptError(f"{key}: {seq_len} is above the model's {positions} positions; use {key} <= {positions}")
    return positions


def load_base(name_or_path: str, quantization: str = "nf4", compute_dtype: str = "auto",
              trust_remote_code: bool = False, device: str = "auto", attn_implementation: str | None = None,
              key: str = "model.name_or_path", allow_pickle: bool = False, quant_storage: torch.dtype | None = None):
    """Load the base model, quantized with bitsandbytes unless quantization='none'.

    Safetensors only, unless allow_pickle (pickle files can run code when loaded). quant_storage: see
    quantization_config (None: bitsandbytes' uint8)."""
    from transformers import AutoModelForCausalLM

    from lora_cpt.hub import local_files_only

    name_or_path = check_model_path(name_or_path, key)
    check_local_model(name_or_path)
    device = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, device)
    kwargs = dict(dtype=dtype, device_map=_device_map(device), trust_remote_code=trust_remote_code,
                  use_safetensors=None if allow_pickle else True)
    if local_files_only(name_or_path):  # a cached hub id while the Hub is unavailable: no request, no retries
        # transformers 5.24 does not hand local_files_only to its adapter_config.json lookup: say it there too
        kwargs.update(local_files_only=True, adapter_kwargs={"local_files_only": True})
    qconfig = quantization_config(quantization, dtype, quant_storage)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        msg = str(e)
        if "safetensors" in msg.lower() and ("no file" in msg.lower() or "does not appear" in msg.lower()):
            raise LoraCptError(f"{key}: '{name_or_path}' has no .safetensors weights; lora-cpt loads safetensors "
                               "only (pickle files can run code). Convert the checkpoint, or pass --allow-pickle "
                               "if you trust it") from None
        raise _load_error(name_or_path, e, key) from None
    return prepare_loaded(model)


def prepare_loaded(model):
    """What lora-cpt does to every freshly loaded base: no KV cache (training and evaluation never need
    one, and packed-document masking is exact only without it); bitsandbytes' CPU repacking off."""
    model.config.use_cache = False
    keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode converts its weight in place to a
    packed inference layout (absmax cast to bf16, double quant undone); afterwards even training
    forwards go through `gemv_4bit`, which has no autograd. A periodic eval would then change the
    base weights and cut gradients. Keeping the training layout costs some CPU eval speed only.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def meta_model(config_dir: str | Path, trust_remote_code: bool = False, key: str = ""):
    """(config, model) built from config.json on the meta device: structure and counts, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_cpt.hub import local_files_only

    try:
        config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=trust_remote_code,
                                            local_files_only=local_files_only(str(config_dir)))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise LoraCptError(f"{key + ': ' if key else ''}cannot read the model config in '{config_dir}': "
                           f"{first_line(e)}") from None
    return config, model


def quantized_module_names(model) -> set[str]:
    """The linear layers bitsandbytes quantizes, as transformers decides: all but the output head,
    tied weights, the last module and `_keep_in_fp32_modules`."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and should_convert_module(name, skip)}


def embedding_module_names(model) -> tuple[str, str | None]:
    """Full module names of the input embedding and the output head (None when the model has none)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(inp)], (names.get(id(out)) if out is not None else None)


def is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _linear_leaf_names(model, exclude: set[str]) -> list[str]:
    """Leaf names of every linear layer (nn.Linear, bitsandbytes Linear4bit/8bitLt, GPT-2 Conv1D)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, Conv1D)
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
              if isinstance(m, kinds) and name not in exclude}
    return sorted(leaves)


def enable_checkpointing(model, offload: bool = False, compute_device: str | None = None) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (reentrant breaks DDP and needs
    input grads), optionally holding each layer's saved input in pinned CPU RAM (transformers' own
    `offload=True`: only the checkpoint inputs move; what backward recomputes stays on the GPU)."""
    import inspect

    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    # compute_device: where the model will compute (default: where its first parameter is; under FSDP rank 0 loads
    # on the CPU and the others on the meta device before the shards go to the GPU)
    if offload and (compute_device or next(model.parameters()).device.type) == "cpu":
        offload = False  # the activations are in CPU RAM already (and pinned memory needs an accelerator)
    if offload:
        if enable is None or "offload" not in inspect.signature(enable).parameters:
            import transformers

            raise LoraCptError(f"train.offload_activations needs transformers' activation offloading (transformers "
                               f">= 5.24; installed: {transformers.__version__}); upgrade transformers or set it false")
        enable(activation_checkpointing_kwargs=kwargs, offload=True)
    elif enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _head_leaves(model, head_name: str | None) -> list[torch.nn.Module]:
    """The nn.Linear modules that compute the output head: the head itself, or inside PEFT's wrappers its
    base layer, original module and trainable copy (never the LoRA A/B matrices)."""
    if head_name is None:
        return []
    return [m for n, m in model.named_modules()
            if (n == head_name or n.startswith(head_name + ".")) and ".lora_" not in n[len(head_name):]
            and isinstance(m, torch.nn.Linear) and getattr(m, "weight", None) is not None]


def _cast_input_to_weight(module, args):
    if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and args[0].dtype != module.weight.dtype:
        return (args[0].to(module.weight.dtype), *args[1:])
    return None


ROW_MULTIPLE = 64  # embedding rows are padded to a multiple of this (tensor-core friendly; what most models use)


@dataclass
class VocabularyExtension:
    """What `extend_tokenizer` added, and (after `extend_vocabulary`) the embedding rows that train."""

    terms: list[str] = field(default_factory=list)  # added, in id order
    ids: list[int] = field(default_factory=list)  # their new token ids
    pieces: list[list[int]] = field(default_factory=list)  # the ids the original tokenizer gave each term
    skipped: dict[str, str] = field(default_factory=dict)  # term -> why it was not added
    rows_before: int = 0  # embedding rows of the loaded base
    rows: int = 0  # embedding rows after resizing
    trainable_rows: list[int] = field(default_factory=list)  # new ids + padding rows: what PEFT trains and saves


def extend_tokenizer(tokenizer, terms: list[str], log=print) -> VocabularyExtension:
    """Add `terms` to `tokenizer` in place as plain (non-special) tokens; returns what was added.

    Tokens are added with normalized=False: a term matches the raw text exactly as written (anywhere, also inside
    a word), before the tokenizer's normalizer runs. With normalized=True, SentencePiece-style "legacy" normalizers
    (Llama 2, Phi-3) make transformers swallow the space before the term while llama.cpp keeps it; with
    normalized=False both tokenize the same way (a space before the term is its own token). Terms the tokenizer
    already encodes as one token, or that are in its vocabulary, are skipped with a note."""
    from transformers import AddedToken

    ext = VocabularyExtension()
    vocab = tokenizer.get_vocab()
    for term in terms:
        pieces = tokenizer(term, add_special_tokens=False)["input_ids"]
        if term in vocab:
            ext.skipped[term] = f"already token {vocab[term]}"
        elif len(pieces) == 1:
            ext.skipped[term] = f"already one token ({pieces[0]})"
        elif not pieces:
            ext.skipped[term] = "the tokenizer gives it no tokens"
        else:
            ext.terms.append(term)
            ext.pieces.append(pieces)
    before = len(tokenizer)
    if ext.terms:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in ext.terms])
    ext.ids = [tokenizer.convert_tokens_to_ids(t) for t in ext.terms]
    if ext.ids != list(range(before, before + len(ext.terms))):
        raise LoraCptError(f"model.add_tokens: the tokenizer gave the new terms ids {ext.ids[:3]}..., not "
                           f"{before}...; it cannot be extended this way")
    if ext.skipped:
        shown = ", ".join(f"'{t}' ({why})" for t, why in list(ext.skipped.items())[:5])
        log(f"note: model.add_tokens: skipped {len(ext.skipped)} term(s) the tokenizer already has: {shown}"
            + (", ..." if len(ext.skipped) > 5 else ""))
    log(f"model.add_tokens: {len(ext.terms)} new token(s), vocabulary {before:,} -> {len(tokenizer):,}")
    return ext


def padded_rows(n_tokens: int, rows: int, multiple: int = ROW_MULTIPLE) -> int:
    """Embedding rows for a tokenizer of n_tokens: the current rows, or n_tokens rounded up to `multiple`."""
    return max(rows, -(-n_tokens // multiple) * multiple)


@torch.no_grad()
def extend_vocabulary(model, ext: VocabularyExtension, n_tokens: int) -> VocabularyExtension:
    """Resize the embeddings (input and output) of `model` for a tokenizer of n_tokens extended by `ext`, and
    initialise every new token's row as the mean of the rows of the pieces the original tokenizer split it into
    (input and output matrices each from their own rows; a tied matrix once). Padding rows (beyond n_tokens) get
    the mean of all original rows. Embeddings are never quantized by bitsandbytes, so this works on a 4-bit base.
    Sets ext.rows_before/rows/trainable_rows (the new ids and padding rows)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    ext.rows_before = inp.weight.shape[0]
    if n_tokens > ext.rows_before and inp.weight.dim() != 2:
        raise LoraCptError("model.add_tokens: the input embedding is not a plain matrix; cannot resize it")
    ext.rows = padded_rows(n_tokens, ext.rows_before)
    originals = [inp.weight.detach().float().clone()]
    if out is not None and not is_tied(model):
        originals.append(out.weight.detach().float().clone())
    if ext.rows != ext.rows_before:
        model.resize_token_embeddings(ext.rows, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    if len(originals) == 2:
        matrices.append(model.get_output_embeddings().weight)
        if matrices[1].shape[0] != ext.rows:
            raise LoraCptError(f"model.add_tokens: the output head has {matrices[1].shape[0]} rows after resizing, "
                               f"not {ext.rows}; this architecture cannot be extended")
    for weight, original in zip(matrices, originals):
        for new_id, pieces in zip(ext.ids, ext.pieces):
            weight[new_id] = original[pieces].mean(0).to(weight.dtype)
        if ext.rows > n_tokens:
            weight[n_tokens:ext.rows] = original.mean(0).to(weight.dtype)
    ext.trainable_rows = sorted(set(ext.ids) | set(range(max(n_tokens, ext.rows_before), ext.rows)))
    return ext


def add_lora(model, r: int = 16, alpha: float = 32.0, dropout: float = 0.0, target_modules="all-linear",
             rslora: bool = False, dora: bool = False, embeddings: str = "none", gradient_checkpointing: bool = True,
             compute_dtype: torch.dtype | None = None, offload_activations: bool = False,
             token_rows: list[int] | None = None, compute_device: str | None = None):
    """Wrap `model` in a PeftModel with a trainable LoRA adapter.

    embeddings: none -> embed_tokens/lm_head frozen; lora -> LoRA on them too;
    full -> trainable copies (modules_to_save), tied models stay tied.
    token_rows (model.add_tokens, with embeddings none): only these rows of the input embedding and the output
    head train (PEFT's trainable_token_indices; a tied head follows the embedding's rows).

    Dtypes: trainable parameters are float32 (bf16 cannot hold updates below its resolution); frozen
    weights stay as loaded, in the 16-bit compute dtype. Unlike PEFT's `prepare_model_for_kbit_training`
    (which casts every non-quantized weight to float32), norms, embeddings and head keep their 16-bit
    checkpoint values: in float32 they cost 2 bytes more per parameter (2 GB per matrix at 128K x 4096) and
    make the residual stream between layers float32, doubling the checkpointed activations.
    compute_dtype: when 16-bit, the embedding output is put in it (a float32 trainable copy or LoRA term
    would otherwise turn the residual stream float32) and the head is fed its own weight dtype.
    """
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model, offload_activations, compute_device)
    embed_name, head_name = embedding_module_names(model)
    emb_leaves = [embed_name.rsplit(".", 1)[-1]] + ([head_name.rsplit(".", 1)[-1]] if head_name else [])
    targets = target_modules
    modules_to_save = None
    tied = is_tied(model)
    if embeddings == "lora":
        if targets == "all-linear":
            targets = _linear_leaf_names(model, exclude={head_name} if head_name else set())
        targets = sorted(set([targets] if isinstance(targets, str) else targets) | set(emb_leaves))
    elif embeddings == "full":
        modules_to_save = emb_leaves
    token_indices = None
    if token_rows and embeddings == "none":
        token_indices = {leaf: list(token_rows) for leaf in (emb_leaves[:1] if tied else emb_leaves)}
    elif token_rows and embeddings == "lora":
        raise LoraCptError("model.add_tokens needs lora.embeddings none or full, not lora")
    try:
        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_rslora=rslora,
            use_dora=dora, modules_to_save=modules_to_save, task_type="CAUSAL_LM", bias="none",
            ensure_weight_tying=bool(tied and modules_to_save),  # token rows: PEFT ties a tied head itself
            trainable_token_indices=token_indices,
        )
        model = get_peft_model(model, config)
    except ValueError as e:
        raise LoraCptError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # the same Parameter object: tied copies stay tied
    base = model.get_base_model()
    if compute_dtype in (torch.bfloat16, torch.float16):
        def to_compute(module, args, output):
            return output.to(compute_dtype) if torch.is_tensor(output) and output.is_floating_point() else output

        base.get_input_embeddings().register_forward_hook(to_compute)
    for leaf in _head_leaves(base, head_name):  # `base` is the model we named the modules of, now LoRA-wrapped
        leaf.register_forward_pre_hook(_cast_input_to_weight)
    # The adapter holds LoRA (and trainable copies) only: PEFT's default ("auto") would also write the full
    # frozen embedding and head into every checkpoint when LoRA targets them (~2 GB per save on Llama-3).
    # They are saved only when the vocabulary was resized (`model.lora_cpt_save_embeddings = True`).
    model.lora_cpt_save_embeddings = False
    model.save_pretrained = functools.partial(_save_adapter, model)
    return model


def _save_adapter(model, save_directory, *args, **kwargs):
    kwargs.setdefault("save_embedding_layers", bool(getattr(model, "lora_cpt_save_embeddings", False)))
    return type(model).save_pretrained(model, save_directory, *args, **kwargs)


def embedding_parameter_names(model) -> set[str]:
    """Names of trainable parameters that belong to the input embedding or the output head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed_name, head_name = embedding_module_names(base)
    leaves = {embed_name.rsplit(".", 1)[-1]} | ({head_name.rsplit(".", 1)[-1]} if head_name else set())
    out = set()
    for name, p in model.named_parameters():
        if p.requires_grad and any(f".{leaf}." in f".{name}" for leaf in leaves):
            out.add(name)
    return out


def load_adapter(model, adapter_dir: str | Path, is_trainable: bool = False):
    """PeftModel.from_pretrained, with missing or unexpected adapter tensors an error, not a warning."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise LoraCptError(f"adapter '{adapter_dir}': no {ADAPTER_CONFIG}; give a PEFT adapter directory")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraCptError(f"adapter '{adapter_dir}': no adapter_model.safetensors (pickle adapters are refused)")
    from lora_cpt.integrity import check_adapter

    check_adapter(adapter_dir)  # a damaged config or header, LoRA ranks that disagree: named before PEFT loads
    rows = adapter_vocab_rows(adapter_dir)
    if rows is not None and rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)  # the adapter saves every row beyond the base's
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    with safe_open(str(weights), framework="pt") as f:
        saved = set(f.keys())
    # the embedding matrices themselves are optional: saved when the vocabulary was resized (PEFT's "auto", unless
    # only token rows train) or asked for
    needed = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False).keys())
    allowed = needed | set(get_peft_model_state_dict(peft_model, save_embedding_layers=True).keys())
    missing, unexpected = sorted(needed - saved), sorted(saved - allowed)
    if missing or unexpected:
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + \
            ("; " if missing and unexpected else "") + \
            (f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "")
        raise LoraCptError(f"adapter '{adapter_dir}' does not fit the model: tensors {what}; was it trained on "
                           "this base model?")
    return peft_model


def adapter_vocab_rows(adapter_dir: str | Path) -> int | None:
    """Embedding rows an adapter was trained with when it resized the vocabulary (model.add_tokens: one past its
    highest trainable token row; lora.embeddings full: the saved copies' rows), else None."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    indices = config.get("trainable_token_indices")
    if indices:
        lists = indices.values() if isinstance(indices, dict) else [indices]
        return max(max(rows) for rows in lists if rows) + 1
    if config.get("modules_to_save"):
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if ".modules_to_save." in k
                      and any(f".{leaf}." in k for leaf in ("embed_tokens", "wte", "embed_in", "word_embeddings"))]
        return max((s[0] for s in shapes if len(s) == 2), default=None)
    return None
