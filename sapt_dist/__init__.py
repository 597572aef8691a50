"""sapt-dist: continual learning of LLMs with SAPT on DeepSpeed.

Import what you need from the submodules: ``sapt_dist.method.ops.mixture_lora`` (the fused
mixture), ``sapt_dist.method.model.SAPTModel`` (SAPT around a HF causal LM or T5-style
encoder-decoder),
``sapt_dist.checkpoint.blocks`` (save / load / peft export), ``sapt_dist.train.run`` (the
continual-learning run). Importing the package itself does no work.
"""

__version__ = "0.1.0"
