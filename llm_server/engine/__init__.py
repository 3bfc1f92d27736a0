"""The generation engine: one scheduler thread owns the model and batches every request.

The engine knows nothing about HTTP. Callers build a :class:`GenerationRequest` (token ids
plus :class:`SamplingParams`), ``submit`` it, and read a :class:`GenerationStream` of text
deltas ending in a :class:`Finished` event, from asyncio or from a plain thread.
"""
