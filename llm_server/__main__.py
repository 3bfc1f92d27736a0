"""``python -m llm_server``: the ``start_llm_server`` command."""

from llm_server.cli import main

main()
