"""The HTTP server: ``create_app`` builds the ASGI app, ``serve`` runs it with uvicorn.

Imports onnxruntime, numpy, Pillow and Starlette only — never torch.
"""

from lensforge.serve.app import create_app, model_name, serve

__all__ = ["create_app", "model_name", "serve"]
