"""The web app: the engine (Studio) on the embedded model, and the real page in headless Chromium (Selenium).

The browser tests need the [app] extra, selenium and Chromium + chromedriver (.ci/run installs them); without
them they skip on a developer machine and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import test_cli

from animatediff_lite.app.models import EMBEDDED, NONE, preset_form, scan
from animatediff_lite.app.studio import Studio
from animatediff_lite.cli import build_parser, main
from animatediff_lite.errors import CheckpointError
from animatediff_lite.presets import get_preset

tiny_models = test_cli.tiny_models  # the tiny SD folder + motion module fixture, shared with test_cli.py


def _need(what: str, ok: bool) -> None:
    """Skip without ``what`` on a developer machine; fail under CI, which must have it (.ci/run installs it)."""
    if not ok:
        message = f"missing: {what} (.ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def app_ui():
    """The Gradio page module (needs the [app] extra): skipped without it here, a failure under CI."""
    try:
        import animatediff_lite.app.ui as ui  # lazy: Gradio is an optional extra
    except ImportError as e:
        _need(f"gradio, the [app] extra ({e})", False)
    return ui


def _studio(tmp_path, models_dir=None):
    return Studio(models_dir, tmp_path / "out", "cpu")


def test_studio_keeps_models_loaded_and_writes_result_with_sidecar(tmp_path, capsys):
    studio = _studio(tmp_path)
    steps = []
    form = {"prompt": "a red circle moving up", "seed": "7", "steps": 2.0, "base": EMBEDDED, "format": "gif"}
    path, settings = studio.generate(form, lambda frac, text: steps.append(frac))
    assert steps == [0.5, 1.0] and path.parent == studio.output_dir and path.suffix == ".gif"
    assert json.loads(path.with_suffix(".json").read_text()) == settings
    assert (settings["seed"], settings["steps"], settings["frames"], settings["height"]) == (7, 2, 8, 32)
    second, _ = studio.generate({**form, "prompt": "a blue square moving right", "seed": ""})
    assert studio.loads == 1 and second != path  # same models: not loaded again
    assert studio.gallery() == [str(second), str(path)]
    mp4, _ = studio.generate({**form, "format": "mp4", "frames": "4", "height": "", "width": "48"})
    assert mp4.suffix == ".mp4" and mp4.stat().st_size > 0 and studio.gallery()[0] == str(mp4)
    # The sidecar remakes the result exactly.
    assert main(["generate", "--from", str(path.with_suffix(".json")), "-o", str(tmp_path / "re.gif")]) == 0
    assert (tmp_path / "re.gif").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("form, message", [
    ({"height": 60}, "height must be a positive multiple of 8, got 60"),
    ({"height": 60.5}, "height must be a positive multiple of 8, got 60.5"),  # not rounded on the way
    ({"frames": 100}, "num_frames=100 exceeds the motion module's limit"),
    ({"seed": "abc"}, "Seed must be a whole number"),
    ({"height": "abc"}, "Height must be a number (or blank for the model's default), got 'abc'"),
    ({"width": " 40.5 "}, "width must be a positive multiple of 8, got 40.5"),
    ({"steps": 0}, "steps"),
    ({"sampler": "nope"}, "nope"),
])
def test_studio_bad_input_reaches_the_library(tmp_path, form, message):
    studio = _studio(tmp_path)
    with pytest.raises(ValueError) as err:
        studio.generate({"prompt": "a", "steps": 1, **form})
    assert message in str(err.value)
    assert studio.gallery() == []


def test_models_folder_choices_unreadable_file_and_presets(tmp_path):
    root = tmp_path / "models"
    for sub in ("StableDiffusion/stable-diffusion-v1-5", "Motion_Module", "DreamBooth_LoRA", "MotionLoRA"):
        (root / sub).mkdir(parents=True)
    (root / "StableDiffusion" / "broken.safetensors").write_bytes(b"not a safetensors file")
    (root / "Motion_Module" / "mm_sd_v15_v2.ckpt").write_bytes(b"x")
    (root / "DreamBooth_LoRA" / "toonyou_beta3.safetensors").write_bytes(b"x")
    (root / "DreamBooth_LoRA" / "notes.txt").write_text("not a model")
    choices = scan(root)
    assert choices.base == [EMBEDDED, "StableDiffusion/broken.safetensors", "StableDiffusion/stable-diffusion-v1-5"]
    assert choices.motion_module == ["Motion_Module/mm_sd_v15_v2.ckpt"]
    assert choices.dreambooth == ["DreamBooth_LoRA/toonyou_beta3.safetensors"] and choices.motion_lora == []
    assert scan(None).base == [EMBEDDED]
    with pytest.raises(ValueError, match="--models-dir .*: not a folder"):
        scan(tmp_path / "nowhere")
    studio = _studio(tmp_path, root)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        studio.generate({"prompt": "a", "base": "StableDiffusion/broken.safetensors", "motion_module": NONE})
    form = preset_form(get_preset("ToonYou"))
    assert form["dreambooth"] == "DreamBooth_LoRA/toonyou_beta3.safetensors"
    assert form["motion_module"].startswith("Motion_Module/") and form["prompt"] and form["seed"].isdigit()
    assert (form["frames"], form["height"], form["width"]) == (16, 512, 512)


def test_preset_fills_the_sampler():
    """Picking AnimateLCM must select its lcm sampler (the form kept ddim: 6 DDIM steps of an LCM model)."""
    assert preset_form(get_preset("AnimateLCM"))["sampler"] == "lcm"
    assert preset_form(get_preset("ToonYou"))["sampler"] == "ddim"
    ui = app_ui()
    assert "sampler" in ui.PRESET_KEYS and set(ui.PRESET_KEYS) <= set(ui.FORM)


def test_app_binds_to_localhost_by_default():
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.output_dir, args.models_dir) == ("127.0.0.1", 7860, "outputs", None)


# ---- the real page ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        import gradio  # noqa: F401
        have = True
    except ImportError:
        have = False
    _need("gradio (the [app] extra)", have)
    out = tmp_path_factory.mktemp("app") / "outputs"
    port = _free_port()
    log = open(out.parent / "server.log", "w")  # noqa: SIM115  (closed at teardown)
    proc = subprocess.Popen([sys.executable, "-m", "animatediff_lite", "app", "--output-dir", str(out), "--port",
                             str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if _get(url + "/")[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the app did not start: {(out.parent / 'server.log').read_text()[-2000:]}")
    yield url, out
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    _need("selenium, chromium and chromedriver", bool(chromium and driver and webdriver))
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=Service(driver))
    yield d
    d.quit()


def _field(d, label: str):
    """The input of the field whose visible label is ``label`` (how a user finds it)."""
    from selenium.webdriver.common.by import By

    return d.find_element(By.XPATH, f"//span[@data-testid='block-info' and normalize-space()='{label}']"
                                    "/ancestor::*[.//input or .//textarea][1]//*[self::textarea or self::input]")


def _set(d, label: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    el = _field(d, label)
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(text)


def _generate_and_wait(d, timeout: float = 180) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = _field(d, "Status")
    before = status.get_attribute("value")
    d.find_element(By.XPATH, "//button[normalize-space()='Generate']").click()
    WebDriverWait(d, timeout).until(lambda _: status.get_attribute("value") not in ("", before))
    return status.get_attribute("value")


def test_page_generates_on_default_model_and_shows_errors(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, out = server
    d = browser
    d.get(url)
    WebDriverWait(d, 60).until(lambda _: d.find_elements(By.XPATH, "//button[normalize-space()='Generate']"))
    for label in ("Prompt", "Negative prompt", "Sampler", "Steps", "Guidance", "Seed", "Frames", "Height", "Width"):
        assert _field(d, label).is_displayed(), label

    # Bad input: the library's message appears on the page as text, and the server goes on serving.
    _set(d, "Prompt", "a red circle moving up")
    _set(d, "Height", "60")
    assert _generate_and_wait(d) == "Error: height must be a positive multiple of 8, got 60"
    _set(d, "Height", "")

    _set(d, "Seed", "11")
    _set(d, "Steps", "3")
    status = _generate_and_wait(d)
    assert status.startswith("Saved ") and "(seed 11)" in status, status
    name = status.split()[1]
    video, sidecar = out / name, (out / name).with_suffix(".json")
    assert video.suffix == ".gif" and video.exists() and sidecar.exists()
    settings = json.loads(sidecar.read_text())
    assert (settings["prompt"], settings["seed"], settings["steps"]) == ("a red circle moving up", 11, 3)

    # The page shows the video itself, served from the output folder.
    img = WebDriverWait(d, 30).until(lambda _: [i for i in d.find_elements(By.TAG_NAME, "img")
                                                if name in (i.get_attribute("src") or "")])
    code, body = _get(img[0].get_attribute("src"))
    assert code == 200 and body == video.read_bytes()
    assert [i for i in d.find_elements(By.XPATH, "//a[@download]") if name in (i.get_attribute("href") or "")]
    if os.environ.get("ANIMATEDIFF_LITE_SCREENSHOT"):  # docs/app.png is made this way (docs/app.md)
        d.save_screenshot(os.environ["ANIMATEDIFF_LITE_SCREENSHOT"])

    # generate --from remakes the page's result exactly.
    assert main(["generate", "--from", str(sidecar), "-o", str(tmp_path / "again.gif")]) == 0
    assert (tmp_path / "again.gif").read_bytes() == video.read_bytes()


def test_no_path_traversal_through_file_routes(server):
    url, out = server
    out.mkdir(parents=True, exist_ok=True)
    secret = out.parent / "secret.txt"
    secret.write_text("top secret")
    inside = out / "inside.json"
    inside.write_text("{}")
    code, body = _get(f"{url}/gradio_api/file={inside}")
    assert code == 200 and body == b"{}"  # the output folder is served
    quote = urllib.parse.quote
    attempts = [f"/gradio_api/file={secret}", f"/gradio_api/file={out}/../secret.txt",
                f"/gradio_api/file={quote(str(out) + '/../secret.txt', safe='')}", "/gradio_api/file=/etc/passwd",
                f"/gradio_api/file={out}/%2e%2e/secret.txt", "/file=/etc/passwd", f"/file={secret}",
                "/gradio_api/file=../../../../etc/passwd", "/static/../../../../etc/passwd",
                "/assets/..%2f..%2f..%2f..%2fetc%2fpasswd", f"/gradio_api/file={out}/..%2fsecret.txt"]
    for path in attempts:
        code, body = _get(url + path)
        assert b"top secret" not in body and b"root:" not in body, (path, code)
        assert code != 200 or b"<html" in body.lower()[:200], (path, code)  # at most the page itself


def test_queue_runs_one_generation_at_a_time_and_tells_positions(server):
    """Three requests at once: one runs, the others wait with their queue position (Gradio's queue status)."""
    from gradio_client import Client

    from animatediff_lite.app.ui import FORM

    url, out = server
    client = Client(url + "/", verbose=False)
    form = {"base": EMBEDDED, "dreambooth": NONE, "motion_module": NONE, "lora": NONE, "lora_scale": 1.0,
            "motion_lora": NONE, "motion_lora_scale": 1.0, "sparsectrl": NONE, "control_images": "",
            "prompt": "a blue square moving right",
            "negative_prompt": "", "sampler": "ddim", "steps": "20", "guidance_scale": "", "seed": "",
            "frames": "", "height": "", "width": "", "context_frames": "", "context_overlap": "", "format": "gif"}
    jobs = [client.submit(*[form[k] for k in FORM], api_name="/run") for _ in range(3)]
    ranks: set[int] = set()
    deadline = time.time() + 300
    while not all(j.done() for j in jobs) and time.time() < deadline:
        for j in jobs:
            rank = getattr(j.status(), "rank", None)
            if rank is not None:
                ranks.add(rank)
        time.sleep(0.02)
    statuses = [j.result()[3] for j in jobs]
    assert all(s.startswith("Saved ") for s in statuses), statuses
    assert max(ranks) >= 1, ranks  # someone waited behind another generation and was told its position


def test_studio_models_folder_selection_and_swaps(tiny_models, tmp_path):
    """Base + motion module picked from an upstream-style folder; a new selection loads again, a new prompt not."""
    studio = _studio(tmp_path, tiny_models)
    form = {"prompt": "a corgi", "seed": "3", "steps": "1", "frames": "2", "height": "16", "width": "16",
            "base": "StableDiffusion/stable-diffusion-v1-5", "motion_module": "Motion_Module/mm_tiny_v2.ckpt",
            "dreambooth": NONE, "lora": NONE, "motion_lora": NONE}
    path, settings = studio.generate(form)
    assert settings["motion_module"] == str(tiny_models / "Motion_Module" / "mm_tiny_v2.ckpt")
    studio.generate({**form, "prompt": "a cat"})
    assert studio.loads == 1
    studio.generate({**form, "motion_module": NONE})
    assert studio.loads == 2 and len(studio.gallery()) == 3
    with pytest.raises(CheckpointError, match="missing.ckpt"):
        studio.generate({**form, "motion_module": "Motion_Module/missing.ckpt"})
