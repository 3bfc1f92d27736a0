"""HTTP layer: FastAPI app factory, routes, auth, errors, metrics and the chat page.

It never imports torch: generation goes through ``serving.ChatService`` and the abstract
``engine.interface.Engine`` kept on ``app.state``.
"""
