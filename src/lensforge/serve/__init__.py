"""The HTTP server: ``create_app`` builds the ASGI app, ``serve`` runs it with uvicorn.

Imports onnxruntime, numpy, Pillow and Starlette only — never torch.
"""

from lensforge.runtime.bundle import display_name as model_name
from lensforge.serve.app import create_app
from lensforge.serve.lifecycle import serve

__all__ = ["create_app", "model_name", "serve"]
