"""Batch generation (generate --batch) and remaking a result from its sidecar (generate --from), on the embedded
default model: job keys, sidecars, resume, failures, model sets loaded once, and 2 gloo ranks == 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import test_cli
import torch

import animatediff_lite.batch as batch_mod
from animatediff_lite import FreeInit, load_pipeline, save_video
from animatediff_lite.cli import main
from animatediff_lite.jobs import read_jobs
from animatediff_lite.video import load_video_frames

tiny_models = test_cli.tiny_models  # the tiny SD folder + motion module fixture, shared with test_cli.py

JOBS = """
[defaults]
steps = 2
negative_prompt = "blurry"

[[jobs]]
prompt = "a red circle moving up"
seed = 1

[[jobs]]
id = "travel"
prompt = {0 = "a red circle moving up", 7 = "a blue square moving right"}
seed = 2
free_init = {iterations = 2, method = "gaussian"}
eta = 0.5

[[jobs]]
id = "long"
prompt = "a green triangle moving left"
frames = 12
context_frames = 8
context_overlap = 2
guidance_scale = 3

[[jobs]]
id = "bad"
prompt = "x"
height = 60

[[jobs]]
id = "v2v"
prompt = "a blue square moving right"
video = "in.gif"
strength = 0.6
seed = 5
format = "webp"
fps = 4
"""


@pytest.fixture
def job_file(tmp_path):
    save_video(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), tmp_path / "in.gif")
    (tmp_path / "jobs.toml").write_text(JOBS)
    return tmp_path / "jobs.toml"


def test_batch_writes_video_and_sidecar_per_job_resumes_and_remakes(job_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--batch", str(job_file), "-o", str(out), "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "4 done, 0 skipped, 1 failed" in err and "bad: height must be a positive multiple of 8, got 60" in err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0.gif", "0.json", "long.gif", "long.json", "travel.gif", "travel.json", "v2v.json", "v2v.webp"]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries

    # The sidecar holds every setting, resolved: sizes/steps from the model, the drawn seed, the thread count.
    s = json.loads((out / "long.json").read_text())
    assert (s["frames"], s["height"], s["width"], s["steps"], s["guidance_scale"]) == (12, 32, 32, 2, 3)
    assert isinstance(s["seed"], int) and s["negative_prompt"] == "blurry" and s["threads"] == torch.get_num_threads()
    assert (s["context_frames"], s["context_overlap"], s["dtype"], s["format"]) == (8, 2, "float32", "gif")
    t = json.loads((out / "travel.json").read_text())
    assert t["prompt"] == {"0": "a red circle moving up", "7": "a blue square moving right"}
    assert t["free_init"]["method"] == "gaussian" and t["free_init"]["iterations"] == 2 and t["eta"] == 0.5
    v = json.loads((out / "v2v.json").read_text())
    assert v["video"] == str(tmp_path / "in.gif") and v["strength"] == 0.6 and v["fps"] == 4 and "frames" not in v

    # The same call through the library gives the same video as the batch job.
    pipe = load_pipeline()
    direct = pipe({0: "a red circle moving up", 7: "a blue square moving right"}, negative_prompt="blurry", steps=2,
                  seed=2, eta=0.5, free_init=FreeInit(iterations=2, method="gaussian"),
                  progress=False)
    save_video(direct, tmp_path / "direct.gif")
    assert torch.equal(load_video_frames(tmp_path / "direct.gif"), load_video_frames(out / "travel.gif"))

    # Resume: finished jobs are skipped (files untouched), a deleted one is made again.
    stamp = (out / "travel.gif").stat().st_mtime_ns
    (out / "0.gif").unlink()
    assert main(["generate", "--batch", str(job_file), "-o", str(out), "--device", "cpu", "--no-progress"]) == 1
    assert "1 done, 3 skipped, 1 failed" in capsys.readouterr().err
    assert (out / "travel.gif").stat().st_mtime_ns == stamp

    # --from remakes each result bit for bit (the seed drawn for "long" included), into a folder or a file.
    for name, video in (("long", "long.gif"), ("travel", "travel.gif"), ("v2v", "v2v.webp")):
        assert main(["generate", "--from", str(out / f"{name}.json"), "-o", str(tmp_path / "re"),
                     "--no-progress"]) == 0
        assert (tmp_path / "re" / video).read_bytes() == (out / video).read_bytes(), name
    assert main(["generate", "--from", str(out / "long.json"), "-o", str(tmp_path / "x.gif"), "--no-progress"]) == 0
    assert (tmp_path / "x.gif").read_bytes() == (out / "long.gif").read_bytes()
    assert json.loads((tmp_path / "x.json").read_text())["seed"] == s["seed"]


def test_jsonl_and_each_model_set_loaded_once(tmp_path, monkeypatch, capsys):
    lines = [{"prompt": "a red circle moving up", "seed": i, "steps": 1, **({"dtype": "bfloat16"} if i % 2 else {})}
             for i in range(4)]
    lines.append({"id": "missing", "prompt": "a", "base": "nowhere.safetensors"})
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    loads = []
    real = batch_mod.load_pipeline
    monkeypatch.setattr(batch_mod, "load_pipeline", lambda **kw: loads.append(kw) or real(**kw))
    assert main(["generate", "--batch", str(tmp_path / "jobs.jsonl"), "-o", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert [kw["dtype"] for kw in loads] == [torch.float32, torch.bfloat16, torch.float32]  # 3 model sets, 3 loads
    assert "4 done, 0 skipped, 1 failed" in err and "missing: loading the models:" in err and "nowhere" in err
    assert json.loads((tmp_path / "o" / "1.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("text, message", [
    ('[[jobs]]\nprompt = "a"\nstepz = 3\n', "job 1 (id 0): unknown key 'stepz'"),
    ('[defaults]\nsampler_name = "x"\n[[jobs]]\nprompt = "a"\n', "[defaults]: unknown key 'sampler_name'"),
    ('[[jobs]]\nprompt = "a"\n[[jobs]]\nid = "0"\nprompt = "b"\n', "job 2: id '0' is also job 1's"),
    ('[[jobs]]\nid = "../up"\nprompt = "a"\n', "job 1: id must be letters"),
    ('[[jobs]]\nnegative_prompt = "a"\n', "job 1 (id 0): 'prompt' is missing"),
    ('[[jobs]]\nprompt = {x = "a"}\n', "prompt table keys must be frame numbers"),
    ('[[jobs]]\nprompt = "a"\nfree_init = {iterations = 0}\n', "free_init: FreeInit iterations must be"),
    ('[[jobs]]\nprompt = "a"\nloras = [["l.safetensors", "high"]]\n', "loras entry"),
    ('[[jobs]]\nprompt = "a"\nformat = "avi"\n', "format must be one of gif, mp4, webp"),
    ('[[jobs]]\nprompt = "a"\nsteps = [1]\n', "steps must be a number, string or boolean"),
    ('[job]\nprompt = "a"\n', "unknown top-level key(s) 'job'"),
    ('[[jobs]\n', "not valid TOML"),
    ('', "no jobs in the file"),
])
def test_bad_job_files_name_the_job_and_key(tmp_path, capsys, text, message):
    (tmp_path / "jobs.toml").write_text(text)
    assert main(["generate", "--batch", str(tmp_path / "jobs.toml"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / "jobs.toml") in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_job_keys_paths_and_loras(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "jobs.toml").write_text(
        '[defaults]\nbase = "../sd"\nloras = ["a.safetensors", ["b.safetensors", 0.5], '
        '{path = "c.safetensors", scale = 2}]\n[[jobs]]\nid = "x"\nprompt = "p"\nmotion_module = "/abs/mm.ckpt"\n'
        'motion_loras = ["zoom.ckpt"]\n[[jobs]]\nprompt = "q"\nloras = []\n')
    a, b = read_jobs(tmp_path / "sub" / "jobs.toml")
    kw = a.load_kwargs()
    assert kw["base"] == str(tmp_path / "sd") and kw["motion_module"] == "/abs/mm.ckpt"
    assert kw["loras"] == [(str(tmp_path / "sub" / n), s) for n, s in (("a.safetensors", 1.0), ("b.safetensors", 0.5),
                                                                        ("c.safetensors", 2.0))]
    assert kw["motion_loras"] == [(str(tmp_path / "sub" / "zoom.ckpt"), 1.0)]
    assert b.id == "1" and "loras" not in b.model and a.model_key != b.model_key


def test_batch_and_from_refuse_other_generate_flags(tmp_path, capsys):
    (tmp_path / "j.toml").write_text('[[jobs]]\nprompt = "a"\n')
    assert main(["generate", "a cat", "--batch", str(tmp_path / "j.toml"), "--steps", "3", "-o", "o"]) == 2
    assert "--batch takes what to generate from its file; drop a prompt, --steps" in capsys.readouterr().err
    assert main(["generate", "--batch", str(tmp_path / "j.toml")]) == 2
    assert "--batch needs -o" in capsys.readouterr().err
    assert main(["generate", "--from", str(tmp_path / "none.json"), "-o", "x.gif"]) == 2
    assert "none.json: cannot read the settings file" in capsys.readouterr().err


def test_two_gloo_ranks_share_the_jobs_and_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 ... generate --batch: rank r takes jobs r, r+2, ...; the files equal a
    one-process run's; one summary line (rank 0); a failed job makes the exit code non-zero."""
    jobs = [{"prompt": p, "seed": i, "steps": 2} for i, p in enumerate(
        ["a red circle moving up", "a blue square moving right", "a green triangle moving left",
         "a yellow circle moving down", "a red square moving up"])]
    jobs.append({"id": "bad", "prompt": "x", "width": 12})
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(j) for j in jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["generate", "--batch", str(tmp_path / "jobs.jsonl"), "--device", "cpu", "--no-progress"]
    # one thread in both runs: equal thread counts give equal bits
    one = subprocess.run([sys.executable, "-m", "animatediff_lite", *args, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "animatediff_lite", *args, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 1 and two.returncode != 0, two.stderr[-3000:]
    assert "5 done, 0 skipped, 1 failed" in one.stderr
    assert two.stderr.count("5 done, 0 skipped, 1 failed") == 1, two.stderr[-3000:]
    assert "rank 1: job bad failed: width must be a positive multiple of 8, got 12" in two.stderr
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(files) == 10
    for name in files:
        if name.endswith(".gif"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    owners = {json.loads((tmp_path / "two" / f"{i}.json").read_text())["threads"] for i in range(5)}
    assert owners == {1}


def test_model_keys_reach_load_pipeline_like_the_cli_flags(tiny_models, tmp_path):
    """A job with base, motion_module, loras and motion_loras gives the video of the same generate flags."""
    sd = tiny_models / "StableDiffusion" / "stable-diffusion-v1-5"
    mm = tiny_models / "Motion_Module" / "mm_tiny_v2.ckpt"
    test_cli.write_tiny_loras(tmp_path)
    (tmp_path / "jobs.toml").write_text(
        f'[defaults]\nbase = "{sd}"\nmotion_module = "{mm}"\nframes = 2\nheight = 16\nwidth = 16\nsteps = 1\n'
        'seed = 3\n[[jobs]]\nid = "plain"\nprompt = "a corgi"\n[[jobs]]\nid = "lora"\nprompt = "a corgi"\n'
        'loras = [["l.safetensors", 0.5]]\nmotion_loras = [{path = "ml.ckpt", scale = 2}]\n')
    assert main(["generate", "--batch", str(tmp_path / "jobs.toml"), "-o", str(tmp_path / "o"), "--device", "cpu",
                 "--no-progress"]) == 0
    flags = ["a corgi", "--base", str(sd), "--motion-module", str(mm), "--frames", "2", "--height", "16",
             "--width", "16", "--steps", "1", "--seed", "3", "--device", "cpu", "--no-progress"]
    assert main(["generate", *flags, "-o", str(tmp_path / "plain.gif")]) == 0
    assert main(["generate", *flags, "--lora", f"{tmp_path / 'l.safetensors'}:0.5", "--motion-lora",
                 f"{tmp_path / 'ml.ckpt'}:2", "-o", str(tmp_path / "lora.gif")]) == 0
    batch = {name: load_video_frames(tmp_path / "o" / f"{name}.gif") for name in ("plain", "lora")}
    for name, frames in batch.items():
        assert torch.equal(frames, load_video_frames(tmp_path / f"{name}.gif")), name
    assert not torch.equal(batch["plain"], batch["lora"])  # the LoRAs were merged
    s = json.loads((tmp_path / "o" / "lora.json").read_text())
    assert s["loras"] == [[str(tmp_path / "l.safetensors"), 0.5]]
    assert s["motion_loras"] == [[str(tmp_path / "ml.ckpt"), 2.0]]
    assert s["base"] == str(sd) and s["motion_module"] == str(mm)


def test_threads_reach_batch_and_from(tmp_path, monkeypatch):
    """--threads N with --batch / --from sets N threads; --from without it uses the sidecar's count (load_pipeline
    used to reset both to its default of 1 on the CPU)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        (tmp_path / "jobs.toml").write_text('[[jobs]]\nid = "a"\nprompt = "a red circle moving up"\nsteps = 1\n'
                                            'frames = 4\nseed = 1\n')
        assert main(["generate", "--batch", str(tmp_path / "jobs.toml"), "-o", str(tmp_path / "o"), "--device",
                     "cpu", "--no-progress", "--threads", "2"]) == 0
        assert json.loads((tmp_path / "o" / "a.json").read_text())["threads"] == 2
        sidecar = json.loads((tmp_path / "o" / "a.json").read_text())
        (tmp_path / "b.json").write_text(json.dumps({**sidecar, "threads": 3}))
        assert main(["generate", "--from", str(tmp_path / "b.json"), "-o", str(tmp_path / "r.gif"), "--device", "cpu",
                     "--no-progress"]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["threads"] == 3
        assert main(["generate", "--from", str(tmp_path / "b.json"), "-o", str(tmp_path / "s.gif"), "--device", "cpu",
                     "--no-progress", "--threads", "2"]) == 0
        assert json.loads((tmp_path / "s.json").read_text())["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_compile_reaches_load_pipeline_with_batch_and_from(tmp_path, monkeypatch):
    """--compile [MODE] is a run flag --batch / --from accept: it must reach load_pipeline (it was dropped)."""
    seen = []

    def recording(**kwargs):
        seen.append(kwargs.get("compile"))
        return load_pipeline(**{**kwargs, "compile": False})  # the mode is what is checked, not compiling

    monkeypatch.setattr(batch_mod, "load_pipeline", recording)
    (tmp_path / "jobs.toml").write_text('[[jobs]]\nid = "a"\nprompt = "a red circle moving up"\nsteps = 1\n'
                                        'frames = 4\nseed = 1\n')
    assert main(["generate", "--batch", str(tmp_path / "jobs.toml"), "-o", str(tmp_path / "o"), "--device", "cpu",
                 "--no-progress", "--compile", "reduce-overhead"]) == 0
    assert main(["generate", "--from", str(tmp_path / "o" / "a.json"), "-o", str(tmp_path / "r.gif"), "--device",
                 "cpu", "--no-progress", "--compile"]) == 0
    assert seen == ["reduce-overhead", "default"]
