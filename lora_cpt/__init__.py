"""lora-cpt: continued pre-training of causal LMs with LoRA/QLoRA, then merge to full weights.

Library entry points, one per pipeline stage:

    from lora_cpt.config import load_recipe        # typed recipe + overrides
    from lora_cpt.data import prepare_data         # corpus -> packed blocks + report
    from lora_cpt.model import load_base, add_lora # quantized base + LoRA
    from lora_cpt.train import train               # the whole training run
    from lora_cpt.evaluate import perplexity, evaluate_run
"""

__version__ = "0.1.0"


def _quiet_kernels_notice() -> None:
    """Drop one bitsandbytes log line, at its logger only: on a CPU with AVX512-BF16 and without the optional
    `kernels` package, importing bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community"
    and goes on with its own CPU kernel. Every lora-cpt user on such a CPU would see it, library users too (the CLI
    also quiets bitsandbytes' logging as a whole); anything else that logger says still shows."""
    import logging

    class KernelsNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(KernelsNotice())


_quiet_kernels_notice()
