"""Start-up cost: `import animatediff_lite` and the command line's parser do not import torch (about 1 s on a
small CPU); the public names still resolve on first use."""

from __future__ import annotations

import re
import subprocess
import sys

import animatediff_lite as ad

PUBLIC = ["DDIM", "SD15", "TINY", "CLIPConfig", "CheckpointError", "DDIMConfig", "FreeInit", "ModelConfig",
          "MotionConfig", "Pipeline", "UNetConfig", "VAEConfig", "__version__", "apply_loras", "generate",
          "load_pipeline", "merge_lora", "save_video", "unmerge"]


def _modules_after(code: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                       capture_output=True, text=True, timeout=120, check=True)
    return set(r.stdout.split())


def test_import_does_not_load_torch():
    mods = _modules_after("import animatediff_lite")
    assert "animatediff_lite" in mods and "torch" not in mods and "numpy" not in mods


def test_cli_parser_and_help_do_not_load_torch():
    mods = _modules_after("from animatediff_lite.cli import build_parser\nbuild_parser().format_help()")
    assert "torch" not in mods
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "animatediff_lite", "presets"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "ToonYou" in r.stdout
    assert re.search(r"\|\s+animatediff_lite\.presets$", r.stderr, re.MULTILINE)  # -X importtime lists every module ...
    assert not re.search(r"\|\s+torch$", r.stderr, re.MULTILINE)  # ... and torch is not one of them


def test_public_names_resolve():
    assert sorted(ad.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(ad, name) is not None, name
        assert name in dir(ad)
    from animatediff_lite import Pipeline, load_pipeline
    from animatediff_lite.loading.pipeline_load import load_pipeline as direct
    from animatediff_lite.pipeline import Pipeline as direct_pipeline

    assert load_pipeline is direct and Pipeline is direct_pipeline
    try:
        ad.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown attributes must raise AttributeError")
