"""Serving layer: chat requests in, engine requests out. Knows nothing about HTTP.

``ChatService`` applies system prompts and the chat template, checks context limits,
submits to the :class:`~llm_server.engine.interface.Engine`, and runs the spec's answer
improvement pipeline (each pass through the same engine, so it is batched too).
"""
