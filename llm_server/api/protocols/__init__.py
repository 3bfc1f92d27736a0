"""Protocol adapters: each wire format (the spec's ``/chat``, OpenAI's Chat Completions,
Completions and Responses, Anthropic's Messages) parsed into the serving layer's one request
model, and its events written back.

An adapter owns its routes, its request models and its response shapes, and nothing else:
resolving a request (defaults, tools, grammar) is ``llm_server.serving``'s, and running it over
HTTP (open, collect, stream, cancel) is ``llm_server.api.protocols.turns``'.
"""
