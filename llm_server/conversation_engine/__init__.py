"""The spec's in-process Python API: ConversationEngine, input preparation, generation, improvement.

Deliberately imports nothing: ``improvement`` and ``inputs`` are torch-free and are reused by
the serving layer, which must not pull in torch through this package.
"""
