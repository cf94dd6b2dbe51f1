"""Load a causal LM as a quantized base and put LoRA adapters on it.

    model = load_base("meta-llama/Llama-3.1-8B", quantization="nf4")
    model = add_lora(model, r=16, alpha=32, embeddings="none")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lora_cpt.errors import LoraCptError
from lora_cpt.util import first_line

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraCptError("train.device: 'cuda' was asked for but no CUDA GPU is visible; use device=auto or cpu")
    return device


def resolve_compute_dtype(name: str, device: str) -> torch.dtype:
    """auto: bf16 on GPUs that have it, fp16 on those that don't (T4, V100), fp32 on CPU
    (bf16 matmuls are slow on many CPUs)."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device == "cuda" and not torch.cuda.is_bf16_supported():
            raise LoraCptError("model.compute_dtype: this GPU has no bfloat16 support; use float16 or auto")
        return dtype
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _device_map(device: str):
    if device == "cuda":
        return {"": int(os.environ.get("LOCAL_RANK", 0))}  # one full copy per process under DDP
    return {"": "cpu"}


def check_model_path(name_or_path: str, key: str = "model.name_or_path", need_config: bool = True) -> None:
    """A local-looking path must exist and hold a config; a hub id is checked when it is loaded."""
    if not name_or_path:
        raise LoraCptError(f"{key}: not set; give a hub id (e.g. Qwen/Qwen2.5-0.5B) or a local model directory")
    path = Path(name_or_path).expanduser()
    looks_local = (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
                   or os.sep != "/" and os.sep in name_or_path)
    if path.exists():
        if not path.is_dir():
            raise LoraCptError(f"{key}: '{name_or_path}' is a file; give the model directory")
        if need_config and not (path / "config.json").is_file():
            raise LoraCptError(f"{key}: '{name_or_path}' has no config.json; is it a Hugging Face model directory?")
    elif looks_local:
        raise LoraCptError(f"{key}: '{name_or_path}' does not exist")


def _load_error(name_or_path: str, e: Exception, key: str) -> LoraCptError:
    return LoraCptError(f"{key}: cannot load '{name_or_path}': {first_line(e)}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, key: str = "model.name_or_path"):
    from transformers import AutoTokenizer

    check_model_path(name_or_path, key, need_config=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e, key) from None
    return tokenizer


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def model_positions(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """The model's maximum positions from its config (no weights), or None if it does not say."""
    from transformers import AutoConfig

    check_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e, "model.name_or_path") from None
    config = getattr(config, "get_text_config", lambda: config)()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_base(name_or_path: str, quantization: str = "nf4", compute_dtype: str = "auto",
              trust_remote_code: bool = False, device: str = "auto", attn_implementation: str | None = None,
              key: str = "model.name_or_path", allow_pickle: bool = False):
    """Load the base model, quantized with bitsandbytes unless quantization='none'.

    Safetensors only, unless allow_pickle (pickle files can run code when loaded)."""
    from transformers import AutoModelForCausalLM

    check_model_path(name_or_path, key)
    device = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, device)
    kwargs = dict(dtype=dtype, device_map=_device_map(device), trust_remote_code=trust_remote_code,
                  use_safetensors=None if allow_pickle else True)
    qconfig = quantization_config(quantization, dtype)
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
    model.config.use_cache = False  # no KV cache in training/eval: keeps packed-document masking exact
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

    try:
        config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=trust_remote_code)
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


def add_lora(model, r: int = 16, alpha: float = 32.0, dropout: float = 0.0, target_modules="all-linear",
             rslora: bool = False, dora: bool = False, embeddings: str = "none", gradient_checkpointing: bool = True,
             frozen_embeddings_dtype: torch.dtype | None = None):
    """Wrap `model` in a PeftModel with a trainable LoRA adapter.

    embeddings: none -> embed_tokens/lm_head frozen; lora -> LoRA on them too;
    full -> trainable copies (modules_to_save), tied models stay tied.
    frozen_embeddings_dtype: keep frozen embedding/head weights in this (16-bit) dtype instead of the
    float32 that prepare_model_for_kbit_training casts them to (2 GB less per matrix at 128K x 4096).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks DDP and needs input grads
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
        if frozen_embeddings_dtype in (torch.bfloat16, torch.float16) and embeddings != "full":
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None:
                    module.to(frozen_embeddings_dtype)
            head = model.get_output_embeddings()
            if head is not None:  # the final norm returns float32: feed the head its own dtype, autocast or not
                head.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:]))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
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
    try:
        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_rslora=rslora,
            use_dora=dora, modules_to_save=modules_to_save, task_type="CAUSAL_LM", bias="none",
            ensure_weight_tying=bool(tied and modules_to_save),
        )
        model = get_peft_model(model, config)
    except ValueError as e:
        raise LoraCptError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
    return model


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
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoraCptError(f"adapter '{adapter_dir}': no adapter_config.json; give a PEFT adapter directory")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraCptError(f"adapter '{adapter_dir}': no adapter_model.safetensors (pickle adapters are refused)")
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    with safe_open(str(weights), framework="pt") as f:
        saved = set(f.keys())
    expected = set(get_peft_model_state_dict(peft_model).keys())
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + \
            ("; " if missing and unexpected else "") + \
            (f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "")
        raise LoraCptError(f"adapter '{adapter_dir}' does not fit the model: tensors {what}; was it trained on "
                           "this base model?")
    return peft_model
