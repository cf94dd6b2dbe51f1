"""Private interfaces lora-cpt still relies on, pinned: each test fails loudly when an upgrade changes one
(issue 14, item 2). pyproject.toml bounds the versions these were checked against; when a bound is raised,
this file says what to re-check."""

import inspect

import pytest
import torch


def test_trainer_checkpoint_seams():
    """resilience.AtomicCheckpoints stages checkpoints by overriding these two private Trainer methods; the
    staging works only if _save_checkpoint asks _get_output_dir where to write."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    assert "_get_output_dir(" in inspect.getsource(Trainer._save_checkpoint)


def test_quantizer_helpers_plan_and_merge_use():
    """model.quantized_module_names asks transformers which linear layers bitsandbytes quantizes."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    assert list(inspect.signature(get_keys_to_not_convert).parameters) == ["model"]
    assert list(inspect.signature(should_convert_module).parameters)[:2] == ["full_name", "patterns"]
    assert should_convert_module("model.layers.0.mlp.up_proj", ["lm_head"])
    assert not should_convert_module("lm_head", ["lm_head"])


def test_bitsandbytes_cpu_repack_switch():
    """model.keep_4bit_layout turns off bitsandbytes' in-place CPU repacking through this undocumented
    attribute; if Linear4bit stops reading it, evaluation could again change the 4-bit base."""
    import bitsandbytes as bnb

    assert "support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit)


def test_tied_weights_keys_attribute(tiny_tied_model):
    """merge reads which weights are tied from `all_tied_weights_keys` (transformers 5)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_tied_model), dtype=torch.float32)
    assert "lm_head.weight" in model.all_tied_weights_keys


def test_activation_checkpointing_with_offload_is_available():
    """model.enable_checkpointing uses transformers' own activation offload."""
    from transformers import PreTrainedModel

    enable = getattr(PreTrainedModel, "activation_checkpointing_enable", None) or \
        getattr(PreTrainedModel, "_activation_checkpointing_enable", None)
    if enable is None:
        pytest.fail("transformers no longer has activation_checkpointing_enable: model.enable_checkpointing "
                    "falls back to plain gradient checkpointing (no offload)")
    assert "offload" in inspect.signature(enable).parameters


def test_trainer_gradient_norm_seam():
    """CptTrainer keeps the gradient norm the Trainer computes for clipping (`_get_grad_norm`) so that
    SafetyCallback needs no second pass over the gradients; it must be computed before on_pre_optimizer_step."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._get_grad_norm).parameters) == ["self", "model", "grad_norm"]
    loop = inspect.getsource(Trainer._run_epoch)
    assert loop.index("self._get_grad_norm(") < loop.index("on_pre_optimizer_step(") < loop.index("optimizer.step()")
    assert "self._track_num_input_tokens(inputs)" in loop  # what include_num_input_tokens_seen="no" turns off


def test_trainer_resume_seam():
    """CptTrainer._load_optimizer_and_scheduler re-applies the recipe's learning-rate schedule after the Trainer
    restores optimizer.pt and scheduler.pt (a finished run made longer, a lowered rate after a non-finite stop):
    the Trainer must still load both there, once, with the checkpoint folder, after building the scheduler."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._load_optimizer_and_scheduler).parameters) == ["self", "checkpoint"]
    prepare = inspect.getsource(Trainer._prepare_for_training)
    assert prepare.count("self._load_optimizer_and_scheduler(") == 1
    assert prepare.index("self.create_scheduler(") < prepare.index("self._load_optimizer_and_scheduler(")
    body = inspect.getsource(Trainer._load_optimizer_and_scheduler)
    assert "OPTIMIZER_NAME" in body and "SCHEDULER_NAME" in body


def test_fused_adamw_skips_a_step_on_found_inf():
    """SafetyCallback skips a non-finite update on the device by setting `found_inf` on a torch optimizer that
    declares `_step_supports_amp_scaling` (the protocol torch's GradScaler uses with fused optimizers)."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert opt._step_supports_amp_scaling
    p.grad = torch.full((4,), float("nan"))
    opt.grad_scale, opt.found_inf = None, torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and float(opt.state[p]["step"]) == 0
    p.grad, opt.found_inf = torch.ones(4), torch.tensor(0.0)
    opt.step()
    assert (p.detach() < 1).all() and float(opt.state[p]["step"]) == 1


def test_trainer_fsdp_seams():
    """train.parallel fsdp (lora_cpt.fsdp.accelerate_sharded, CptTrainer): after the Trainer creates its accelerator,
    lora-cpt sets accelerate's state to FSDP with an FSDP2 plugin and the Trainer's `is_fsdp_enabled`. That works
    only while: the Trainer reads the flag from the state in create_accelerator_and_postprocess; FSDP2 creates the
    optimizer before prepare; accelerate's fsdp2_prepare_model returns an FSDPModule unchanged; prepare_model wraps
    a multi-process model in DDP unless FSDP2 (which it refuses for DTensors); checkpoints go through
    save_fsdp_model/save_fsdp_optimizer and load_fsdp_model; and the sync_each_batch switch is read per micro-batch."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from transformers import Trainer

    assert "self.is_fsdp_enabled = getattr(self.accelerator.state, \"fsdp_plugin\", None) is not None" in \
        inspect.getsource(Trainer.create_accelerator_and_postprocess)
    prepare = inspect.getsource(Trainer._prepare_for_training)
    assert "is_fsdp2 = self.is_fsdp_enabled" in prepare and "delay_optimizer_creation = False" in prepare
    assert "if is_type_fsdp:\n        return model" in inspect.getsource(fsdp2_prepare_model)
    assert "is_fsdp2" in inspect.getsource(AcceleratorState) and DistributedType.FSDP.value == "FSDP"
    assert "return self.distributed_type == DistributedType.FSDP and self.fsdp_plugin.fsdp_version == 2" in \
        inspect.getsource(AcceleratorState.is_fsdp2.fget)
    saving = inspect.getsource(Trainer._save_optimizer_and_scheduler)
    assert "elif self.is_fsdp_enabled:" in saving and "save_fsdp_model(" in saving and "save_fsdp_optimizer(" in saving
    assert "load_fsdp_model(" in inspect.getsource(Trainer._load_from_checkpoint)
    assert "sync_each_batch" in inspect.getsource(Trainer._run_epoch)
    assert "elif self.is_fsdp2:" in inspect.getsource(Accelerator.prepare)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    assert plugin.fsdp_version == 2 and "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
