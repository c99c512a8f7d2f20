"""What the published AnimateLCM text-to-video files look like (``wangfuyun/AnimateLCM`` on the Hugging Face hub).

* ``AnimateLCM_sd15_t2v.ckpt``, the motion module: the original AnimateDiff key layout with a mid-block
  module (the AnimateLCM repository's ``configs/inference-t2v.yaml`` sets ``motion_module_mid_block``, so it
  reads as v2: per-frame GroupNorm, 8 heads) and no ``pos_encoder`` tables at all. Its position encoding is
  the usual sinusoid with 64 rows (``PositionalEncoding`` in the repository's ``motion_module.py``), so
  without a stored table the length comes from here, recognised by "animatelcm" in the file name. The
  diffusers ``MotionAdapter`` copy in the same hub repository states it in ``config.json``.
* ``AnimateLCM_sd15_t2v_lora.safetensors``, the spatial LoRA: kohya keys over diffusers module names
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`` / ``lora_up`` /
  ``alpha``), read by the ordinary kohya LoRA loader. The repository's own loader merges
  ``W += 1/8 * scale * up @ down`` whatever the file says; diffusers and ComfyUI (and this library) merge
  ``scale * alpha / rank * up @ down``. The published scales (diffusers 0.8, the repository 1.0, ComfyUI
  0.9-1.0) are consistent with each other only if the file stores alpha = rank / 8; that is inferred, not
  checked against the real file (no weights can be downloaded here). A copy without ``alpha`` keys would
  need scale 1/8 of the usual.

Sampling recipe (``configs/batch_inference_example.yaml``): 4 steps, guidance 1.5, LCM sampling; diffusers'
documentation: 6 steps, guidance 1.5-2, LoRA 0.8. See docs/sampling.md.
"""

from __future__ import annotations

ANIMATELCM_PE_LEN = 64


def animatelcm_pe_len(name: str) -> int | None:
    """64 when ``name`` (a motion-module file or folder name) names an AnimateLCM module, else None."""
    return ANIMATELCM_PE_LEN if "animatelcm" in name.lower().replace("-", "").replace("_", "") else None
