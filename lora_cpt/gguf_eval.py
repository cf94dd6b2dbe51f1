"""A GGUF file run by llama.cpp itself (through llama-cpp-python), not by a re-implementation: its tokenizer and its
logits, to hold an export against the Hugging Face model it came from.

    with GgufModel("merged-f32.gguf", n_ctx=512) as g:
        g.check_vocab(tokenizer)                  # the run's HF tokenizer; one-line error if the vocabularies differ
        ids = g.tokenize(text)                    # as tokenizer(text, add_special_tokens=False,
                                                  #              split_special_tokens=True).input_ids
        for rows in g.logits(ids, chunk=256):     # float32 [<=256, n_vocab] per chunk, positions 0.. in order
            ...

The KV cache is float32: llama.cpp's default f16 cache alone moves logits 1.6e-4 (a tiny Llama) to ~2e-3 relative,
more than an f32 export differs from transformers (~4e-7; Gemma-2 ~3e-4, from llama.cpp's float16 GELU table). The
model runs on the CPU, quietly (llama.cpp's log is collected, and its first error line becomes the message). Loading `llama_cpp.Llama` (public) gives the model, context and tokenizer; the logits come from
llama.cpp's own batch API (`llama_batch_init` / `llama_decode` / `llama_get_logits`, the C functions the binding
exposes), because `Llama.eval` with `logits_all=True` keeps an n_ctx x n_vocab array (2 GB for 4k tokens of a 128k
vocabulary) and without it keeps none; here only the current chunk's rows exist.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lora_cpt.errors import LoraCptError

INSTALL_HINT = "pip install 'lora-cpt[llama-cpp]' (builds llama.cpp from source, ~10-15 min the first time)"
KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16
FIX_VOCAB = "export the GGUF from this run's merged model (lora-cpt export MERGED_DIR --to gguf) and measure that"


def require_llama_cpp():
    """The llama_cpp module, or a one-line error with the install command."""
    try:
        import llama_cpp
    except ImportError:
        raise LoraCptError(f"measuring a GGUF with llama.cpp needs llama-cpp-python: {INSTALL_HINT}") from None
    except (OSError, RuntimeError) as e:  # installed, but its shared library does not load
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraCptError(f"llama-cpp-python is installed but llama.cpp does not load ({first}); reinstall it: "
                           f"pip install --force-reinstall --no-cache-dir llama-cpp-python") from None
    return llama_cpp


def default_threads() -> int:
    """Half the CPUs this process may use, as llama.cpp's own default (its physical cores): its threads spin at each
    barrier, and with more threads than free cores (hyper-threads, a busy machine) a decode gets many times slower
    (tiny models here: 0.03 s on 1 thread, 2-3 s on 2 threads of a loaded 2-core machine)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


@contextmanager
def _llama_errors(llama_cpp, lines: list[str]):
    """llama.cpp's own error lines while loading, collected instead of printed (the reason a file does not load).
    Uses the public llama_log_get/llama_log_set and puts back the callback that was there; the callback is global
    to the process, as llama.cpp's logging is."""
    if not (hasattr(llama_cpp, "llama_log_get") and hasattr(llama_cpp, "llama_log_set")):
        yield
        return
    old, old_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(old), ctypes.byref(old_data))

    @llama_cpp.llama_log_callback
    def collect(level, text, _):
        if level == 4 and text:  # GGML_LOG_LEVEL_ERROR (ggml.h)
            lines.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(old, old_data)


class GgufModel:
    """One GGUF file loaded in llama.cpp on the CPU: tokenizer, vocabulary and float32 logits."""

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int | None = None, kv_cache: str = "f32"):
        self.path = Path(path).expanduser()
        self._llm = None
        self.kv_cache = kv_cache
        if kv_cache not in KV_TYPES:
            raise ValueError(f"kv_cache: expected one of {', '.join(KV_TYPES)}, got {kv_cache!r}")
        if not self.path.is_file():
            raise LoraCptError(f"{self.path}: no such GGUF file; export one with lora-cpt export MODEL_DIR --to gguf")
        with self.path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise LoraCptError(f"{self.path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a .gguf "
                               "written by lora-cpt export or llama.cpp's converter")
        self._lib = llama_cpp = require_llama_cpp()
        threads = n_threads or default_threads()
        errors: list[str] = []
        try:
            with _llama_errors(llama_cpp, errors):
                self._llm = llama_cpp.Llama(
                    str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads, n_threads_batch=threads,
                    type_k=KV_TYPES[kv_cache], type_v=KV_TYPES[kv_cache], logits_all=False, n_gpu_layers=0,
                    verbose=False)
        except (ValueError, RuntimeError) as e:
            # llama.cpp's first complaint is the cause ("unknown model architecture: 'x'", "read: string length ...
            # exceeds remaining file size"); the lines after it say "failed to load model"
            reason = next((line for line in errors if line), "").rpartition("error loading model: ")[2] \
                or str(e).strip().splitlines()[0]
            raise LoraCptError(f"{self.path}: llama.cpp cannot load it ({reason}); re-export it with lora-cpt export, "
                               "or upgrade llama-cpp-python if the architecture is newer than its llama.cpp") from None
        self.n_ctx = self._llm.n_ctx()
        self.n_batch = llama_cpp.llama_n_batch(self._llm.ctx)
        self.n_vocab = self._llm.n_vocab()

    # ------------------------------------------------------------ tokenizer

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokens for `text`: no BOS, special (control) tokens not parsed, added tokens matched; compare
        to `tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids` (as lora-cpt's data
        pipeline encodes: a literal "</s>" in the text stays text; HF's default would match it as the token)."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def token_text(self, token: int) -> str:
        vocab = self._lib.llama_model_get_vocab(self._llm.model)
        return (self._lib.llama_vocab_get_text(vocab, token) or b"").decode("utf-8", "replace")

    def check_vocab(self, tokenizer) -> None:
        """A one-line error naming the file when its vocabulary is not the tokenizer's: fewer tokens, a token whose text
        differs at the same id, or a real token beyond the tokenizer's (rows past it must be unused padding)."""
        lib, n_hf = self._lib, len(tokenizer)
        vocab = lib.llama_model_get_vocab(self._llm.model)
        if self.n_vocab < n_hf:
            raise LoraCptError(f"{self.path}: its vocabulary has {self.n_vocab} tokens, the run's tokenizer {n_hf}; "
                               f"{FIX_VOCAB}")
        hf = tokenizer.convert_ids_to_tokens(list(range(n_hf)))
        for i, want in enumerate(hf):
            got = (lib.llama_vocab_get_text(vocab, i) or b"").decode("utf-8", "replace")
            # SentencePiece-style added tokens are stored with spaces where the HF vocabulary has "▁"
            if want is not None and got.replace("\u2581", " ") != want.replace("\u2581", " "):
                raise LoraCptError(f"{self.path}: token {i} is {got!r} in the GGUF but {want!r} in the run's tokenizer "
                                   f"(a different vocabulary); {FIX_VOCAB}")
        for i in range(n_hf, self.n_vocab):
            if not lib.llama_vocab_get_attr(vocab, i) & lib.LLAMA_TOKEN_ATTR_UNUSED:
                got = (lib.llama_vocab_get_text(vocab, i) or b"").decode("utf-8", "replace")
                raise LoraCptError(f"{self.path}: token {i} ({got!r}) is beyond the run's tokenizer, which has {n_hf} "
                                   f"tokens (a different vocabulary); {FIX_VOCAB}")

    # ------------------------------------------------------------ logits

    def logits(self, tokens: list[int], chunk: int = 256):
        """float32 logits [rows, n_vocab] for positions 0..len(tokens)-1, in order, `chunk` rows at most at a time
        (also at most the context's batch size): the sequence evaluated from position 0 with an empty KV cache."""
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.n_ctx:
            raise LoraCptError(f"{self.path}: {len(tokens)} tokens do not fit the context of {self.n_ctx}; open it "
                               "with a larger n_ctx or evaluate shorter sequences")
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise LoraCptError(f"{self.path}: token id {bad} is outside its vocabulary of {self.n_vocab}; were the ids "
                               "made by another tokenizer? (check_vocab tells)")
        return self._chunks(tokens, max(1, min(int(chunk), self.n_batch)))  # the checks above run now, not lazily

    def _chunks(self, tokens: list[int], chunk: int):
        lib, ctx = self._lib, self._llm.ctx
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        batch = lib.llama_batch_init(chunk, 0, 1)
        try:
            for start in range(0, len(tokens), chunk):
                part = tokens[start:start + chunk]
                batch.n_tokens = len(part)
                for i, token in enumerate(part):
                    batch.token[i] = token
                    batch.pos[i] = start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                rc = lib.llama_decode(ctx, batch)
                if rc != 0:
                    raise LoraCptError(f"{self.path}: llama.cpp could not evaluate tokens {start}.."
                                       f"{start + len(part) - 1} (llama_decode returned {rc})")
                rows = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(len(part), self.n_vocab))
                yield rows.copy()  # the buffer is llama.cpp's, overwritten by the next decode
        finally:
            lib.llama_batch_free(batch)

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self) -> GgufModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GgufModel({str(self.path)!r}, n_vocab={getattr(self, 'n_vocab', '?')}, kv_cache={self.kv_cache!r})"
