"""Operations: ``/health`` and ``/metrics`` routes, the model's readiness (background load), and
graceful shutdown (drain on SIGTERM)."""
