"""The performance levers on CPU: fused q/k/v weights made once (and kept right through LoRA merges), the compiled
UNet3D (one graph, no break, equal to eager), channels-last convolutions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from animatediff_lite.config import MotionConfig
from animatediff_lite.lora import merge_lora, unmerge
from animatediff_lite.motion import MotionModule, TemporalAttention, set_fused_projections


def _motion(seed: int = 0) -> nn.Module:
    """A tiny UNet-like holder of one motion module (MotionLoRA keys name ``motion_modules``)."""
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.motion_modules = nn.ModuleList([MotionModule(32, MotionConfig(num_heads=4, norm_num_groups=8))])
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return holder.eval()


def _attns(model: nn.Module) -> list[TemporalAttention]:
    return [m for m in model.modules() if isinstance(m, TemporalAttention)]


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.motion_modules[0](x, 8)


def _motion_lora(model: nn.Module, seed: int = 5, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    base = "motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks"
    for i in range(2):
        for proj in ("to_q", "to_k", "to_v"):
            state[f"{base}.{i}.processor.{proj}_lora.down.weight"] = torch.randn(rank, 32, generator=g) * 0.3
            state[f"{base}.{i}.processor.{proj}_lora.up.weight"] = torch.randn(32, rank, generator=g) * 0.3
    return state


def test_fused_projections_are_made_once_and_equal_the_separate_ones() -> None:
    model, x = _motion(), torch.randn(2 * 8, 32, 3, 2)
    fused = _run(model, x)
    caches = [a.qkv_weight for a in _attns(model)]
    assert all(c is not None and c.shape == (96, 32) for c in caches)
    _run(model, x)
    assert all(a.qkv_weight is c for a, c in zip(_attns(model), caches, strict=True)), "remade without a change"
    set_fused_projections(model, False)
    assert all(a.qkv_weight is None for a in _attns(model))
    plain = _run(model, x)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert not any("qkv" in k for k in model.state_dict()), "the cache must not change the checkpoint keys"


def test_fused_projections_follow_lora_merge_unmerge_and_casts() -> None:
    """A MotionLoRA merge changes to_q/k/v in place after the cache was made: the next call must use the merged
    weights (this fails with a cache that is never remade), and unmerging must give the original output back."""
    model, x = _motion(), torch.randn(2 * 8, 32, 3, 2)
    before = _run(model, x)
    handle = merge_lora(model, _motion_lora(model), 0.8, kind="motion")
    merged = _run(model, x)
    reference = copy.deepcopy(model)
    set_fused_projections(reference, False)
    torch.testing.assert_close(merged, _run(reference, x), atol=1e-5, rtol=1e-5)
    assert (merged - before).abs().max() > 1e-2
    unmerge(handle)
    torch.testing.assert_close(_run(model, x), before, atol=1e-6, rtol=1e-6)
    model.to(torch.float64)
    assert _run(model, x.double()).dtype == torch.float64
    assert all(a.qkv_weight.dtype == torch.float64 for a in _attns(model))


def test_training_does_not_use_or_build_the_cache() -> None:
    model, x = _motion(), torch.randn(2 * 8, 32, 3, 2)
    model.train()
    out = model.motion_modules[0](x, 8)
    out.square().mean().backward()
    attn = _attns(model)[0]
    assert attn.qkv_weight is None and attn.to_q.weight.grad is not None


# ------------------------------------------------------------------------------------------------ compile


@pytest.fixture(scope="module")
def pipe():
    from animatediff_lite.loading.pipeline_load import load_pipeline

    return load_pipeline(backend="auto")


def _unet_inputs(pipe):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, pipe.unet.config.in_channels, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor(500), ctx


def test_unet3d_traces_as_one_graph(pipe) -> None:
    """torch._dynamo sees the whole UNet3D forward (motion modules, fused projections, ops dispatch) as one graph."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(pipe.unet)(*_unet_inputs(pipe))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_pipeline_equals_eager_and_sees_weight_changes(pipe) -> None:
    """Pipeline.compile (fullgraph=True: a graph break would raise) gives the eager video; an in-place weight change
    between generations (what a LoRA merge does) reaches the compiled graph through the refreshed fused cache."""
    import torch._dynamo

    torch._dynamo.reset()
    kw = dict(num_frames=4, height=32, width=32, steps=2, seed=3, progress=False)
    eager = pipe("a blue square moving right", **kw)
    compiled = copy.deepcopy(pipe).compile(compiler="aot_eager")
    assert compiled.compile_mode == "default"
    torch.testing.assert_close(compiled("a blue square moving right", **kw), eager, atol=1e-5, rtol=1e-5)
    assert not any(k.startswith("_orig_mod") for k in compiled.unet.state_dict())
    for p in (pipe, compiled):
        with torch.no_grad():
            _attns(p.unet)[0].to_q.weight.mul_(3.0)
    changed = pipe("a blue square moving right", **kw)
    assert (changed - eager).abs().max() > 1e-4
    torch.testing.assert_close(compiled("a blue square moving right", **kw), changed, atol=1e-5, rtol=1e-5)


def test_compile_mode_is_checked(pipe) -> None:
    with pytest.raises(ValueError, match="compile mode must be one of"):
        copy.deepcopy(pipe).compile("fastest")


def test_channels_last_convolutions_give_the_same_video(pipe) -> None:
    kw = dict(num_frames=4, height=32, width=32, steps=2, seed=1, progress=False)
    nchw = pipe("a green circle", **kw)
    nhwc = copy.deepcopy(pipe).channels_last()
    conv = next(m for m in nhwc.unet.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc("a green circle", **kw), nchw, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ GPU only

GPU_KW = dict(num_frames=8, height=32, width=32, steps=4, seed=0, progress=False)
PROMPT = "a red circle moving up"


@pytest.fixture(scope="module")
def cpu_video():
    from animatediff_lite.loading.pipeline_load import load_pipeline

    return load_pipeline()(PROMPT, **GPU_KW)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_pipeline_with_every_kernel_follows_fp32(cpu_video, dtype) -> None:
    """The embedded model end to end on CUDA with every kernel forced: within 2x PyTorch's own error of the fp32 CPU
    video ("auto" runs only verified kernels, so this is what verifies them inside a whole generation)."""
    from animatediff_lite.loading.pipeline_load import load_pipeline

    errs = {}
    for backend in ("torch", "triton"):
        pipe = load_pipeline(device="cuda", dtype=dtype, backend=backend)
        errs[backend] = (pipe(PROMPT, **GPU_KW) - cpu_video).abs().max().item()
    print(f"{dtype}: max abs err vs fp32 CPU {errs}")
    assert errs["triton"] <= 2 * errs["torch"] + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_pipeline_equals_eager(mode) -> None:
    """Pipeline.compile with inductor (fullgraph) on CUDA, and with CUDA graphs, gives the eager video."""
    import torch._dynamo

    from animatediff_lite.loading.pipeline_load import load_pipeline

    torch._dynamo.reset()
    pipe = load_pipeline(device="cuda", dtype=torch.float16, backend="triton")
    eager = pipe(PROMPT, **GPU_KW)
    pipe.compile(mode)
    for _ in range(2):  # the second call replays (CUDA graphs are recorded on the first ones)
        torch.testing.assert_close(pipe(PROMPT, **GPU_KW), eager, atol=2e-2, rtol=0)
