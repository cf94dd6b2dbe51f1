"""Per optimizer step, lora-cpt does no host work the plain transformers+PEFT way does not do (issue 19).

benchmarks/step_overhead.py prints the full table (32 layers, wall time too); these tests hold its two counts on
a smaller model: Python function calls per step, and host reads of tensor values (`.item()`, `bool()`, ...; each
a device sync on a GPU), with the same optimizer on both sides so that the difference is lora-cpt's own work.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_overhead as so  # noqa: E402

LAYERS, SEQ_LEN = 12, 64
WARMUP, COUNTED = 2, 3
STEPS = WARMUP + COUNTED + 1


def measure(trainer) -> dict:
    return so.measure_steps(trainer, warmup=WARMUP, timed=0, counted=COUNTED, by_function=True)


@pytest.fixture(scope="module")
def plain_counts(tmp_path_factory):
    torch.manual_seed(0)
    return measure(so.build("plain", LAYERS, SEQ_LEN, STEPS, str(tmp_path_factory.mktemp("plain"))))


def test_python_calls_and_syncs_per_step_are_at_most_plain(tmp_path, plain_counts):
    """The loss check's unwrap_model (accelerate walks every module for compiled regions) ran every step, the
    safety callback walked every parameter and read the gradient norm, the Trainer's token count gathered a device
    tensor and read it back, and the FLOP count walked every parameter per micro-batch: +27% Python calls and two
    syncs of lora-cpt's own per step on a 32-layer model before issue 19."""
    ours = measure(so.build("lora-cpt", LAYERS, SEQ_LEN, STEPS, str(tmp_path)))
    calls = ours["calls_by_function"]
    assert ours["python_calls_per_step"] <= 1.03 * plain_counts["python_calls_per_step"], (ours, plain_counts)
    # each of the four, by name (the token count's sync: below)
    assert "other.py:has_compiled_regions" not in calls and "other.py:extract_model_from_parallel" not in calls
    assert "modeling_utils.py:num_parameters" in plain_counts["calls_by_function"]
    assert "modeling_utils.py:num_parameters" not in calls
    walks = "module.py:named_modules"  # (a generator: one call per module yielded) every walk of the model
    assert calls[walks] < 0.6 * plain_counts["calls_by_function"][walks]
    assert ours["syncs_per_step"] <= plain_counts["syncs_per_step"]
    assert set(ours["syncs_where"]) <= set(plain_counts["syncs_where"]), (ours["syncs_where"],
                                                                         plain_counts["syncs_where"])


def test_the_sync_count_sees_a_sync_of_our_own(tmp_path, plain_counts):
    """Negative control: the Trainer's own token count (include_num_input_tokens_seen, which lora-cpt replaced by
    a count from the batch's shape) is seen as a sync site plain does not have."""
    trainer = so.build("lora-cpt", LAYERS, SEQ_LEN, STEPS, str(tmp_path))
    trainer.args.include_num_input_tokens_seen = "all"
    counts = measure(trainer)
    extra = set(counts["syncs_where"]) - set(plain_counts["syncs_where"])
    assert extra == {"item in trainer.py:_track_num_input_tokens"}, counts["syncs_where"]


def test_the_default_optimizer_does_not_synchronize_per_parameter(tmp_path, monkeypatch):
    """bitsandbytes' paged 8-bit AdamW (plain's optimizer, and lora-cpt's GPU default before issue 19) synchronizes
    with the device after every parameter. On CPU its `sync_gpu` does nothing, so it is counted as the
    `torch.cuda.synchronize()` it is on a GPU. lora-cpt's default (fused AdamW, where plan says it fits) has none;
    lora-cpt given the paged optimizer shows them (the count can fail)."""
    import bitsandbytes.optim.optimizer as bnb_optimizer

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # a stand-in the counter wraps
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: torch.cuda.synchronize())  # as for a CUDA tensor

    def syncs(side: str, optimizer: str) -> dict:
        trainer = so.build(side, 4, SEQ_LEN, STEPS, str(tmp_path / f"{side}-{optimizer}"), optimizer=optimizer)
        return so.measure_steps(trainer, warmup=WARMUP, timed=0, counted=COUNTED)

    where = "cuda.synchronize in test_step_overhead.py:<lambda>"
    plain, ours, paged = syncs("plain", "paged_adamw_8bit"), syncs("lora-cpt", "auto"), syncs("lora-cpt",
                                                                                              "paged_adamw_8bit")
    lora_tensors = 4 * 7 * 2  # 4 layers x 7 linear modules x (A, B)
    assert plain["syncs_where"].get(where, 0) >= lora_tensors
    assert ours["optimizer"] == "adamw_torch_fused" and ours["syncs_per_step"] <= plain["syncs_per_step"]
    assert not any("cuda.synchronize" in k for k in ours["syncs_where"]), ours["syncs_where"]
    assert paged["syncs_where"].get(where, 0) >= lora_tensors  # the count sees them on lora-cpt's side too
