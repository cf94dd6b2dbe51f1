"""Offline fixtures: tiny Llama models and a BPE tokenizer trained here, saved like a hub model.

Every test loads them through `from_pretrained` on a directory, the same code path a hub id takes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["LORA_CPT_CACHE"] = tempfile.mkdtemp(prefix="lora-cpt-test-cache-")  # never the user's cache
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n",
    "Continued pre-training adapts a language model to a domain with next-token prediction.",
    "Perplexity is the exponential of the mean negative log-likelihood per token.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.",
]

DOMAIN_DOCS = [
    f"Section {i}. The compiler reads the source file, builds a syntax tree, and emits byte code. "
    f"Rule {i}: every name is bound in a scope; lookups go local, enclosing, global, builtin. " * (1 + i % 3)
    for i in range(24)
]


def build_tokenizer(vocab_size: int = 384):
    from lora_cpt.demo import build_tokenizer as demo_tokenizer

    return demo_tokenizer(TOKENIZER_TEXT + DOMAIN_DOCS, vocab_size=vocab_size)


def save_tiny_llama(path: Path, tie: bool = False, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64; dims are multiples of bitsandbytes' 64-element blocks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tied_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tied"), tie=True, seed=1)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def write_corpus(folder: Path) -> Path:
    """DOMAIN_DOCS as a folder of Markdown documents, one per file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(DOMAIN_DOCS):
        (folder / f"doc{i:02d}.md").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """A folder of Markdown documents, one per file."""
    return write_corpus(tmp_path / "corpus")


@pytest.fixture()
def general_file(tmp_path) -> Path:
    path = tmp_path / "general.txt"
    path.write_text(" ".join(TOKENIZER_TEXT) * 4, encoding="utf-8")
    return path


def write_recipe(path: Path, model: Path, corpus: Path, output_dir: Path, extra: str = "") -> Path:
    path.write_text(f"""\
model:
  name_or_path: {model}
  quantization: nf4
lora:
  r: 8
  alpha: 16
data:
  train: ["{corpus}"]
  seq_len: 64
  eval_fraction: 0.15
train:
  output_dir: {output_dir}
  max_steps: 30
  micro_batch_size: 4
  grad_accum: 1
  learning_rate: 5.0e-3
  warmup_ratio: 0.0
  log_every: 5
  eval_every: 15
  save_every: 15
  device: cpu
{extra}""", encoding="utf-8")
    return path


def lora_cpt(*args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The console command in a child process, as a user runs it (stdout and stderr captured as text)."""
    return subprocess.run([sys.executable, "-m", "lora_cpt", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=timeout)
