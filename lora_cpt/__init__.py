"""lora-cpt: continued pre-training of causal LMs with LoRA/QLoRA, then merge to full weights.

Library entry points, one per pipeline stage:

    from lora_cpt.config import load_recipe        # typed recipe + overrides
    from lora_cpt.data import prepare_data         # corpus -> packed blocks + report
    from lora_cpt.model import load_base, add_lora # quantized base + LoRA
    from lora_cpt.train import train               # the whole training run
    from lora_cpt.evaluate import perplexity, evaluate_run
"""

__version__ = "0.1.0"
