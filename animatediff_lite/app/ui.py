"""The Gradio page: model pickers, the form, a per-step progress bar, the video, its download, a gallery.

Errors are shown as text in the "Status" box (and the server keeps serving); the queue runs one generation at a
time and shows the others their position.
"""

from __future__ import annotations

import random

import gradio as gr

from ..presets import load_presets
from .models import EMBEDDED, NONE, ModelChoices, preset_form
from .studio import Studio, samplers

FORM = ("base", "dreambooth", "motion_module", "lora", "lora_scale", "motion_lora", "motion_lora_scale",
        "sparsectrl", "control_images", "prompt", "negative_prompt", "sampler", "steps", "guidance_scale", "seed",
        "frames", "height", "width", "context_frames", "context_overlap", "format")
# Number fields send 0 when emptied, so the fields where blank means "the model's default" are text boxes;
# studio.py turns their text into numbers as typed (no rounding).
BLANK = "blank: the model's default"
# Small videos (the embedded model's 32x32) are scaled up to the box instead of shown at their pixel size.
CSS = "#result img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}"


def build(studio: Studio, choices: ModelChoices) -> gr.Blocks:
    """The page for ``studio`` with ``choices`` in the model pickers."""
    presets = load_presets() if studio.models_dir is not None else {}
    with gr.Blocks(title="animatediff-lite", analytics_enabled=False) as page:
        gr.Markdown("## animatediff-lite: text to video")
        with gr.Row():
            with gr.Column():
                f: dict = {}
                preset = gr.Dropdown([NONE, *presets], value=NONE, label="Preset", visible=bool(presets))
                f["base"] = gr.Dropdown(choices.base, value=choices.base[0], label="Base model",
                                        allow_custom_value=True)
                with gr.Row(visible=studio.models_dir is not None):
                    f["dreambooth"] = gr.Dropdown([NONE, *choices.dreambooth], value=NONE, label="DreamBooth",
                                                  allow_custom_value=True)
                    f["motion_module"] = gr.Dropdown([NONE, *choices.motion_module], value=NONE,
                                                     label="Motion module", allow_custom_value=True)
                with gr.Row(visible=studio.models_dir is not None):
                    f["lora"] = gr.Dropdown([NONE, *choices.dreambooth], value=NONE, label="LoRA",
                                            allow_custom_value=True)
                    f["lora_scale"] = gr.Number(1.0, label="LoRA scale", step=0.05)
                    f["motion_lora"] = gr.Dropdown([NONE, *choices.motion_lora], value=NONE, label="MotionLoRA",
                                                   allow_custom_value=True)
                    f["motion_lora_scale"] = gr.Number(1.0, label="MotionLoRA scale", step=0.05)
                with gr.Row(visible=studio.models_dir is not None):  # v3 SparseCtrl (its presets fill both)
                    f["sparsectrl"] = gr.Dropdown([NONE, *choices.sparsectrl], value=NONE, label="SparseCtrl",
                                                  allow_custom_value=True)
                    f["control_images"] = gr.Textbox(label="Key frames", lines=2, placeholder="0:first.png",
                                                     info="SparseCtrl: one FRAME:FILE per line (models folder)")
                f["prompt"] = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle moving up")
                f["negative_prompt"] = gr.Textbox(label="Negative prompt")
                names = samplers()
                f["sampler"] = gr.Dropdown(names, value=names[0], label="Sampler")
                with gr.Row():
                    f["steps"] = gr.Textbox(label="Steps", placeholder="default", info=BLANK)
                    f["guidance_scale"] = gr.Textbox(label="Guidance", placeholder="default", info=BLANK)
                    f["seed"] = gr.Textbox(label="Seed", placeholder="random", info="blank: a random seed")
                    dice = gr.Button("Random seed", size="sm")
                with gr.Row():
                    f["frames"] = gr.Textbox(label="Frames", placeholder="default", info=BLANK)
                    f["height"] = gr.Textbox(label="Height", placeholder="default", info=BLANK)
                    f["width"] = gr.Textbox(label="Width", placeholder="default", info=BLANK)
                with gr.Row():
                    f["context_frames"] = gr.Textbox(label="Context frames", placeholder="off",
                                                     info="sliding windows; blank: off")
                    f["context_overlap"] = gr.Textbox(label="Context overlap", placeholder="auto",
                                                      info="blank: 4, at most half the window")
                    f["format"] = gr.Radio(["gif", "mp4"], value="gif", label="Format")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="Video", type="filepath", interactive=False, height=360, elem_id="result")
                video = gr.Video(label="Video (MP4)", visible=False, interactive=False)
                download = gr.File(label="Download", interactive=False)
                status = gr.Textbox(label="Status", interactive=False, lines=2)
                gallery = gr.Gallery(studio.gallery(), label="Gallery", columns=6, height=240,
                                     object_fit="contain", fit_columns=False)

        def run(*values, progress=gr.Progress()):  # noqa: B008  (Gradio's way to ask for a progress bar)
            form = dict(zip(FORM, values, strict=True))
            try:
                path, settings = studio.generate(form, lambda frac, text: progress(frac, desc=text))
            except Exception as e:  # shown on the page as text; the server keeps serving
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                return gr.Image(value=None), gr.Video(visible=False), None, f"Error: {message}", studio.gallery()
            gif = path.suffix == ".gif"
            text = f"Saved {path.name} (seed {settings['seed']}) with {path.with_suffix('.json').name}"
            return (gr.Image(value=str(path) if gif else None, visible=gif),
                    gr.Video(value=None if gif else str(path), visible=not gif), str(path), text, studio.gallery())

        button.click(run, inputs=[f[k] for k in FORM], outputs=[image, video, download, status, gallery])
        dice.click(lambda: str(random.SystemRandom().randrange(2**63)), outputs=f["seed"])

        def fill(name: str):
            if name not in presets:
                return [gr.skip()] * len(PRESET_KEYS)
            values = preset_form(presets[name])
            return [values[k] for k in PRESET_KEYS]

        preset.change(fill, inputs=preset, outputs=[f[k] for k in PRESET_KEYS])
    return page


PRESET_KEYS = ("base", "dreambooth", "motion_module", "lora", "lora_scale", "motion_lora", "motion_lora_scale",
               "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "frames", "height", "width", "sampler",
               "sparsectrl", "control_images")


def launch(studio: Studio, choices: ModelChoices, host: str = "127.0.0.1", port: int = 7860,
           block: bool = True) -> gr.Blocks:
    """Serve the page: one generation at a time (the queue shows the rest their position); files served only
    from the output folder and Gradio's own cache."""
    page = build(studio, choices)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, allowed_paths=[str(studio.output_dir)], ssr_mode=False,
                prevent_thread_lock=not block, quiet=True, footer_links=["gradio"], css=CSS)
    return page


__all__ = ["EMBEDDED", "build", "launch"]
