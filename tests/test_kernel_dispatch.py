"""Kernel dispatch on CPU: the verified table, "auto" guarded by it, per-shape thresholds, the backend chosen once per
pipeline. Devices, capabilities and Triton versions are faked: no GPU is needed to test the decisions."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from animatediff_lite import ops
from animatediff_lite.kernels import _backend as kb
from animatediff_lite.kernels import verified as vt

ROOT = Path(__file__).resolve().parents[1]
NORM_H200 = ROOT / "benchmarks/results/norm-fp16-nvidia-h200.json"
# The table's writer is a script (benchmarks/write_verified.py); its functions are tested here as a module.
_spec = importlib.util.spec_from_file_location("write_verified", ROOT / "benchmarks/write_verified.py")
wv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wv)


@dataclass
class FakeTensor:
    """What use_triton reads of a tensor, on a CUDA device this machine does not have."""

    dtype: torch.dtype = torch.float16
    device: torch.device = torch.device("cuda", 0)
    requires_grad: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def _table(kernels=("group_norm", "attention"), cap="9.0", triton="3.6", dtypes=("float16",), thresholds=()):
    rows = tuple(vt.Verified(k, cap, triton, dtypes, "2026-11-30", "test") for k in kernels)
    return vt.Table(rows, tuple(thresholds))


def _auto(table, capability=(9, 0), triton="3.6.0"):
    return kb.resolve_backend("auto", torch.device("cuda", 0), table=table, capability=capability, triton=triton)


# ------------------------------------------------------------------------------------------------ the table


def test_committed_table_parses_and_claims_nothing_unproven() -> None:
    """No whole-suite green GPU run exists yet, so nothing may be listed as verified; thresholds are data."""
    table = vt.load_table()
    assert table.verified == (), "kernels/verified.toml lists a kernel without a green GPU run"
    text = vt.TABLE_PATH.read_text()
    assert "write_verified.py" in text


def test_committed_thresholds_are_those_of_the_committed_h200_results() -> None:
    """The [[threshold]] rows are exactly what the writer derives from benchmarks/results/norm-fp16-nvidia-h200.json:
    per-frame GroupNorm needs >= 32x32 (1.07x there; 0.43x at 16x16), joint >= 16x16 (1.3x; 0.84x at 8x8)."""
    derived = wv.thresholds_from_norm_results(json.loads(NORM_H200.read_text()),
                                              "benchmarks/results/norm-fp16-nvidia-h200.json")
    assert {(t.variant, t.min_pixels) for t in derived} == {("per_frame", 32 * 32), ("joint", 16 * 16)}
    assert set(vt.load_table().thresholds) == set(derived)


def test_render_parse_round_trip_and_atomic_write(tmp_path) -> None:
    table = _table(thresholds=[vt.Threshold("group_norm", "per_frame", "9.0", "float16", 1024, "x.json")])
    path = tmp_path / "verified.toml"
    wv.write_table(table, path, header="from a test")
    got = vt.load_table(path)
    assert (set(got.verified), set(got.thresholds)) == (set(table.verified), set(table.thresholds))
    assert [p.name for p in tmp_path.iterdir()] == ["verified.toml"]  # no temporary file left behind
    assert vt.load_table(tmp_path / "missing.toml") == vt.Table()


@pytest.mark.parametrize("text, match", [
    ('[[verified]]\nkernel = "warp"\ncapability = "9.0"\ntriton = "3.6"\ndtypes = ["float16"]\ndate = "d"\n'
     'source = "s"\n', "unknown kernel"),
    ('[[verified]]\nkernel = "geglu"\ncapability = "9.0"\n', "lacks or mistypes"),
    ('[[verified]]\nkernel = "geglu"\ncapability = "sm90"\ntriton = "3.6"\ndtypes = ["float16"]\ndate = "d"\n'
     'source = "s"\n', "capability"),
    ('[[threshold]]\nkernel = "group_norm"\nvariant = "joint"\ncapability = "9.0"\ndtype = "fp16"\n'
     'min_pixels = 4\nsource = "s"\n', "unknown dtypes"),
    ("verified = [", "not valid TOML"),
])
def test_bad_table_rows_are_named(text, match) -> None:
    with pytest.raises(ValueError, match=match) as e:
        vt.parse_table(text, "my_table.toml")
    assert "my_table.toml" in str(e.value)


def _junit(cases: list[tuple[str, str, str]]) -> str:
    body = []
    for stem, name, outcome in cases:
        inner = {"passed": "", "failed": "<failure message='x'/>", "error": "<error message='x'/>",
                 "skipped": "<skipped message='needs a CUDA device'/>"}[outcome]
        body.append(f'<testcase classname="tests.{stem}" name="{name}" time="0.1">{inner}</testcase>')
    return f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>'


GREEN = [("test_kernel_norm", "test_group_norm_matches_reference[x]", "passed"),
         ("test_kernel_norm", "test_gpu_group_norm_sd15[float16-320-64-None]", "passed"),
         ("test_kernel_norm", "test_gpu_geglu_and_compile[float16]", "passed"),
         ("test_kernel_attention", "test_kernel_matches_reference[a]", "passed"),
         ("test_kernel_attention", "test_gpu_sd15_shapes[b]", "skipped"),
         ("test_pipeline", "test_other", "passed")]


def test_writer_takes_kernels_whose_gpu_tests_passed_in_a_green_run() -> None:
    rows = wv.entries_from_junit(_junit(GREEN), (9, 0), "3.6.0", "2026-11-30", "gpu.xml")
    assert {r.kernel for r in rows} == {"group_norm", "geglu"}  # attention's GPU test was skipped: not verified
    assert all((r.capability, r.triton) == ("9.0", "3.6") for r in rows)


@pytest.mark.parametrize("outcome", ["failed", "error"])
def test_writer_refuses_a_run_that_is_not_green(outcome) -> None:
    cases = GREEN + [("test_kernel_temporal", "test_gpu_sd15_levels[c]", outcome)]
    with pytest.raises(ValueError, match="not a green run.*test_gpu_sd15_levels"):
        wv.entries_from_junit(_junit(cases), (9, 0), "3.6.0", "d", "gpu.xml")
    with pytest.raises(ValueError, match="no test cases"):
        wv.entries_from_junit(_junit([]), (9, 0), "3.6.0", "d", "gpu.xml")
    with pytest.raises(ValueError, match="not junit XML"):  # a step killed by its time limit leaves a partial file
        wv.entries_from_junit(_junit(GREEN)[:-40], (9, 0), "3.6.0", "d", "gpu.xml")


def test_writer_reads_several_junit_files_and_all_must_be_green() -> None:
    kernels, gpu = _junit(GREEN[:3]), _junit([("test_vae", "test_cuda_half", "failed")])
    assert {r.kernel for r in wv.entries_from_junit([kernels], (9, 0), "3.6", "d", "k.xml")} == {"group_norm",
                                                                                                "geglu"}
    with pytest.raises(ValueError, match="test_vae::test_cuda_half failed"):
        wv.entries_from_junit([kernels, gpu], (9, 0), "3.6", "d", "k.xml + g.xml")


def test_write_verified_script_merges_rows_and_refuses_red_runs(tmp_path) -> None:
    import subprocess
    import sys

    table = tmp_path / "verified.toml"
    wv.write_table(_table(kernels=("attention",), cap="8.0"), table)
    xml = tmp_path / "gpu.xml"
    xml.write_text(_junit(GREEN))
    attention = tmp_path / "attention-fp16-x.json"
    attention.write_text(json.dumps(_attention_results()))
    cmd = [sys.executable, str(ROOT / "benchmarks/write_verified.py"), str(xml), "--table", str(table),
           "--capability", "9.0", "--triton", "3.6.1", "--norm-json", str(NORM_H200), "--attention-json",
           str(attention), "--temporal-json", str(tmp_path / "not-run.json")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = vt.load_table(table)
    assert {(v.kernel, v.capability) for v in got.verified} == {("attention", "8.0"), ("group_norm", "9.0"),
                                                               ("geglu", "9.0")}
    assert {t.min_pixels for t in got.thresholds} == {1024, 256}
    assert {w.shape for w in got.slower} == {"4096x77x40", "64x77x160"}
    assert "not-run.json not found (benchmark not run), skipped" in done.stdout
    xml.write_text(_junit(GREEN + [("test_kernel_norm", "test_gpu_x", "failed")]))
    before = table.read_text()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 1 and "not a green run" in done.stderr
    assert table.read_text() == before


# ------------------------------------------------------------------------------------------------ dispatch


def test_auto_runs_only_what_the_table_lists_for_this_device() -> None:
    table = _table()
    auto = _auto(table)
    assert kb.use_triton(auto, FakeTensor(), kernel="group_norm")
    assert kb.use_triton(auto, FakeTensor(), kernel="attention")
    assert not kb.use_triton(auto, FakeTensor(), kernel="temporal_attention")  # not listed
    assert not kb.use_triton(auto, FakeTensor(torch.bfloat16), kernel="group_norm")  # dtype not verified
    assert not kb.use_triton(auto, FakeTensor(device=torch.device("cuda", 1)), kernel="group_norm")  # other GPU
    assert not kb.use_triton(auto, FakeTensor(device=torch.device("cpu")), kernel="group_norm")
    assert not kb.use_triton(_auto(table, capability=(8, 0)), FakeTensor(), kernel="group_norm")  # other GPU kind
    assert not kb.use_triton(_auto(table, triton="3.7.0"), FakeTensor(), kernel="group_norm")  # other Triton minor
    assert kb.use_triton(_auto(table, triton="3.6.2"), FakeTensor(), kernel="group_norm")  # same minor
    assert not kb.use_triton(_auto(vt.Table()), FakeTensor(), kernel="group_norm")  # empty table: PyTorch
    assert not kb.use_triton(auto, FakeTensor(), kernel="group_norm", why_not="odd shape")


def test_triton_still_forces_and_torch_never_runs_kernels() -> None:
    forced = kb.resolve_backend("triton", torch.device("cuda", 0), table=vt.Table(), capability=(7, 5), triton="3.0")
    assert forced.strict and kb.use_triton(forced, FakeTensor(torch.bfloat16), kernel="temporal_attention")
    with pytest.raises(RuntimeError, match="backend='triton' requested"):
        kb.use_triton(forced, FakeTensor(), kernel="attention", why_not="head dim 300 > 256")
    assert not kb.use_triton(kb.resolve_backend("torch", "cuda:0"), FakeTensor(), kernel="attention")
    with pytest.raises(ValueError, match="backend must be one of"):
        kb.resolve_backend("cuda")


def test_forcing_triton_where_it_cannot_run_fails_at_load(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' on cpu: the kernels need a CUDA device"):
        kb.resolve_backend("triton", "cpu")
    monkeypatch.setattr(kb, "_TRITON_AVAILABLE", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        kb.resolve_backend("triton", torch.device("cuda", 0))
    monkeypatch.setenv(kb.ENV_VAR, "triton")  # through the environment: not strict, PyTorch where it cannot run
    assert kb.resolve_backend(None, "cpu").name == "triton" and not kb.resolve_backend(None, "cpu").strict


def test_thresholds_send_small_shapes_to_pytorch() -> None:
    """Per-frame GroupNorm below 32x32 and joint below 16x16 take PyTorch on a device with those thresholds."""
    table = vt.load_table()  # the H200 thresholds, with the kernel verified here by a fake row
    auto = _auto(vt.Table(_table(kernels=("group_norm",)).verified, table.thresholds))
    t = FakeTensor()
    for variant, small, large in (("per_frame", 16 * 16, 32 * 32), ("joint", 8 * 8, 16 * 16)):
        assert not kb.use_triton(auto, t, kernel="group_norm", variant=variant, pixels=small)
        assert kb.use_triton(auto, t, kernel="group_norm", variant=variant, pixels=large)
    other = _auto(vt.Table(_table(kernels=("group_norm",), cap="8.0").verified, table.thresholds), capability=(8, 0))
    assert kb.use_triton(other, t, kernel="group_norm", variant="per_frame", pixels=8 * 8)  # no threshold there


def test_group_norm_reports_its_variant_and_size(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(ops, "use_triton", lambda backend, *t, **kw: seen.append(kw) or False)
    x = torch.randn(4, 8, 5, 6)
    ops.group_norm(x, 2, None, None, 1e-5)
    ops.group_norm(x, 2, None, None, 1e-5, frames=2)
    assert [(kw["kernel"], kw["variant"], kw["pixels"]) for kw in seen] == [("group_norm", "per_frame", 30),
                                                                           ("group_norm", "joint", 30)]


# ------------------------------------------------------------------------------------------------ per pipeline


@pytest.fixture(scope="module")
def tiny_pipe():
    from animatediff_lite.loading.pipeline_load import load_pipeline

    return load_pipeline(backend="torch")


def _backends(pipe) -> set:
    return {m.kernel_backend for part in (pipe.unet, pipe.vae, pipe.text_encoder) for m in part.modules()
            if hasattr(m, "kernel_backend")}


def test_backend_is_resolved_once_per_pipeline_and_no_op_reads_the_environment(tiny_pipe, monkeypatch) -> None:
    assert _backends(tiny_pipe) == {tiny_pipe.backend} and tiny_pipe.backend.name == "torch"
    monkeypatch.setenv(kb.ENV_VAR, "not-a-backend")  # any op reading it now would raise
    video = tiny_pipe("a red circle", num_frames=4, steps=2, seed=0, progress=False)
    assert video.shape[:2] == (1, 4)
    with pytest.raises(ValueError, match=kb.ENV_VAR):
        tiny_pipe.set_backend(None)  # None means "the environment", read here, once
    monkeypatch.setenv(kb.ENV_VAR, "torch")
    assert tiny_pipe.set_backend(None).name == "torch" and not tiny_pipe.backend.strict
    tiny_pipe.to("cpu", backend="auto")
    assert _backends(tiny_pipe) == {tiny_pipe.backend} and tiny_pipe.backend.name == "auto"
    assert tiny_pipe.backend.enabled == frozenset()  # auto on the CPU: PyTorch everywhere
    tiny_pipe.set_backend("torch")


def test_env_var_sets_the_default_at_load(monkeypatch) -> None:
    from animatediff_lite.loading.pipeline_load import load_pipeline

    monkeypatch.setenv(kb.ENV_VAR, "torch")
    pipe = load_pipeline()
    assert pipe.backend.name == "torch" and _backends(pipe) == {pipe.backend}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("argv, backend, compile_", [
    ([], None, False),
    (["--backend", "torch"], "torch", False),
    (["--compile"], None, "default"),
    (["--backend", "triton", "--compile", "reduce-overhead"], "triton", "reduce-overhead"),
])
def test_cli_generate_passes_backend_and_compile(monkeypatch, tmp_path, argv, backend, compile_) -> None:
    from animatediff_lite import cli
    from animatediff_lite.loading import pipeline_load

    seen = {}

    def spy(**kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(pipeline_load, "load_pipeline", spy)
    with pytest.raises(_Stop):
        cli.main(["generate", "a red circle", "-o", str(tmp_path / "x.gif"), "--device", "cpu", *argv])
    assert (seen["backend"], seen["compile"]) == (backend, compile_)


def test_load_pipeline_compiles_after_choosing_the_backend(monkeypatch) -> None:
    from animatediff_lite.loading.pipeline_load import load_pipeline
    from animatediff_lite.pipeline import Pipeline

    calls = []
    monkeypatch.setattr(Pipeline, "compile", lambda self, mode="default": calls.append((mode, self.backend.name))
                        or self)
    load_pipeline(backend="torch", compile=True)
    load_pipeline(backend="auto", compile="reduce-overhead")
    assert load_pipeline().compile_mode is None
    assert calls == [("default", "torch"), ("reduce-overhead", "auto")]


def _attention_results() -> dict:
    rows = []
    for (lq, lk, d), times in {(4096, 4096, 40): {"triton split-D": 1.0, "sdpa flash": 1.2, "sdpa cudnn": None},
                               (4096, 77, 40): {"triton split-D": 0.5, "sdpa flash": 0.4},
                               (64, 77, 160): {"triton split-D": None, "sdpa math": 0.1}}.items():
        for variant, ms in times.items():
            row = {"Lq": lq, "Lk": lk, "D": d, "variant": variant}
            rows.append({**row, "ms": ms} if ms is not None else {**row, "error": "No available kernel"})
    return {"benchmark": "attention-fp16", "capability": [9, 0], "results": rows}


def test_shapes_where_pytorch_wins_are_derived_and_take_pytorch() -> None:
    slower = wv.slower_from_attention_results(_attention_results(), "attention.json")
    assert sorted(w.shape for w in slower) == ["4096x77x40", "64x77x160"]  # lost to flash; failed where math ran
    temporal = {"benchmark": "temporal-bf16", "capability": [9, 0], "results": [
        {"part": "block", "F": 16, "C": 320, "variant": "fused block (triton)", "ms": 2.0},
        {"part": "block", "F": 16, "C": 320, "variant": "torch block", "ms": 3.0},
        {"part": "block", "F": 16, "C": 1280, "variant": "fused block (triton)", "ms": 2.0},
        {"part": "block", "F": 16, "C": 1280, "variant": "torch block", "ms": 1.0},
        {"part": "core", "F": 16, "C": 1280, "variant": "triton core", "ms": 9.0}]}
    t_slower = wv.slower_from_temporal_results(temporal, "temporal.json")
    assert [(w.kernel, w.dtype, w.shape) for w in t_slower] == [("temporal_attention", "bfloat16", "16x1280")]
    table = vt.Table(_table(kernels=("attention", "temporal_attention"), dtypes=("float16", "bfloat16")).verified,
                     (), tuple(slower + t_slower))
    auto = _auto(table)
    assert kb.use_triton(auto, FakeTensor(), kernel="attention", shape="4096x4096x40")
    assert not kb.use_triton(auto, FakeTensor(), kernel="attention", shape="4096x77x40")
    assert kb.use_triton(auto, FakeTensor(torch.bfloat16), kernel="temporal_attention", shape="16x320")
    assert not kb.use_triton(auto, FakeTensor(torch.bfloat16), kernel="temporal_attention", shape="16x1280")
    assert kb.use_triton(auto, FakeTensor(), kernel="temporal_attention", shape="16x1280")  # fp16 not measured slower
    path = vt.TABLE_PATH.with_name("unused")
    assert vt.parse_table(wv.render_table(table), str(path)).slower == tuple(sorted(
        table.slower, key=lambda w: (w.kernel, w.capability, w.dtype, w.shape)))


def test_entry_points_report_their_shape_keys(monkeypatch) -> None:
    from animatediff_lite import attention as attention_module

    seen = []
    spy = lambda backend, *t, **kw: seen.append((kw["kernel"], kw.get("shape"))) or False  # noqa: E731
    monkeypatch.setattr(attention_module, "use_triton", spy)
    monkeypatch.setattr(ops, "use_triton", spy)
    q, kv = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    attention_module.attention(q, kv, kv)
    c = 16
    w = torch.randn(c, c)
    ops.temporal_attention(torch.randn(3, 4, c), None, None, w, w, w, w, None, heads=2)
    assert seen == [("attention", "5x7x8"), ("temporal_attention", "4x16")]
