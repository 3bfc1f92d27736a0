"""Scale out on Ray Serve: N replicas of the server behind one HTTP endpoint (optional extra ``ray``).

- :mod:`.config`: the ``scale_out:`` section of ``server_config.yaml`` (no Ray needed);
- :mod:`.cli`: ``start_llm_server --replicas N`` / ``--ray-address`` (no Ray needed to import);
- :mod:`.deployment`: the Serve application built from the app factory (imports Ray);
- :mod:`.replica`: what each replica runs (lifespan, replica id header, /health, /metrics);
- :mod:`.metrics`: every replica's Prometheus series behind one ``/metrics``;
- :mod:`.proxy_errors`: the API's JSON error when a replica dies before answering (proxy middleware);
- :mod:`.affinity` + :mod:`.affinity_router`: a conversation's turns reach the replica holding its
  prefix (a session key added in the proxy; a Serve request router that honours it, load as tie-breaker);
- :mod:`.serve_app`: the builder ``serve run`` / ``serve deploy`` config files import.

See docs/scale_out.md.
"""
