"""Serving benchmark parts: the load generator (client), server processes and runners (servers, peers),
and report writing (report). ``benchmarks/bench_serving.py`` is the command line that joins them."""
