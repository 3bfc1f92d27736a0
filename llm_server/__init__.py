"""llm_server: serve Hugging Face chat models over HTTP.

Layers, top to bottom (each imports only the ones below it):

- ``api``: HTTP only (FastAPI app factory, routes, auth, errors, metrics, chat page). No torch.
- ``serving``: turns chat requests into engine requests and runs the improvement pipeline. No HTTP.
- ``engine``: the continuous-batching scheduler that owns the model. No HTTP.
- ``conversation_engine``: the spec's in-process Python API (``ConversationEngine``).
- ``helper_functionality``: model loading and YAML configuration.
"""

__version__ = "0.1.0"
