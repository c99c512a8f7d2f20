"""``animatediff-lite app``: a Gradio web app over the library (the optional ``[app]`` extra).

models.py scans an upstream-style models folder and turns presets into form values; studio.py keeps the models
loaded and makes one result per request (through :mod:`animatediff_lite.batch`, so the sidecar is the batch
one); ui.py is the Gradio page; command.py the CLI subcommand. Only ui.py imports Gradio.
"""
