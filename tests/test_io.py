import pickle

import pytest
import torch

from animatediff_lite import CheckpointError
from animatediff_lite.loading import load_strict, read_state_dict, save_state_dict


def test_roundtrip_and_unwrap(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    save_state_dict(sd, tmp_path / "x.safetensors", {"kind": "test"})
    back = read_state_dict(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "x.ckpt")
    back = read_state_dict(tmp_path / "x.ckpt")
    assert sorted(back) == sorted(sd)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_bad_files(tmp_path, content):
    p = tmp_path / "bad.ckpt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        read_state_dict(p)


def test_truncated_safetensors(tmp_path):
    p = tmp_path / "t.safetensors"
    save_state_dict({"w": torch.randn(64, 64)}, p)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        read_state_dict(p)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.ckpt"
    with open(p, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        read_state_dict(p)
    assert not (tmp_path / "PWNED").exists()


def test_load_strict_names_keys():
    with torch.device("meta"):
        m = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="missing.*bias"):
        load_strict(m, {"weight": torch.zeros(2, 3)}, "f.safetensors", "a Linear")
    with pytest.raises(CheckpointError, match="shape"):
        load_strict(m, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "f", "a Linear")
    load_strict(m, {"weight": torch.ones(2, 3, dtype=torch.float16), "bias": torch.zeros(2)}, "f", "a Linear")
    assert m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"


def test_cast_floating_only_touches_floats():
    from animatediff_lite.loading.io import cast_floating

    state = {"w": torch.randn(3), "steps": torch.arange(3), "h": torch.randn(2, dtype=torch.float16)}
    half = cast_floating(state, "fp16")
    assert half["w"].dtype == torch.float16 and half["h"].dtype == torch.float16
    assert half["steps"].dtype == torch.int64 and torch.equal(half["steps"], state["steps"])
    assert cast_floating(state, torch.bfloat16)["w"].dtype == torch.bfloat16
    kept = cast_floating(state, "keep")
    assert kept == state and kept is not state
    with pytest.raises(KeyError):
        cast_floating(state, "fp8")
