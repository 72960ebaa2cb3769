"""The built-in endpoint: an OpenAI-compatible /v1/chat/completions to rehearse a job for free
(what it does: app.py's docstring). A package, as the one module it was is being split."""

from .app import ServeOptions, make_app, serve_forever, start_subprocess

__all__ = ["ServeOptions", "make_app", "serve_forever", "start_subprocess"]
