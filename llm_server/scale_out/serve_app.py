"""The application builder of ``serve run`` / ``serve deploy`` (``import_path`` in serve_config.yaml).

``import_path: llm_server.scale_out.serve_app:build`` with optional ``args``:
``config_dir`` (a folder with your YAML files, like ``--config-dir``), ``replicas`` (overrides
``scale_out.replicas``) and ``open_access`` (bool). Settings and the ``scale_out:`` section
come from the YAML files, as for ``start_llm_server --replicas``.
"""

from __future__ import annotations

from typing import Any

from ray.serve.deployment import Application

from llm_server.api.settings import load_settings
from llm_server.helper_functionality.yaml_loading import set_config_dir
from llm_server.scale_out.config import load_scale_out_config
from llm_server.scale_out.deployment import build_application, pin_generated_key


def build(args: dict[str, Any]) -> Application:
    """``serve run``'s builder: the application of the YAML configuration (see the module docstring)."""
    if args.get("config_dir"):
        set_config_dir(str(args["config_dir"]))
    settings = load_settings()
    if args.get("open_access"):
        settings = settings.with_overrides(open_access=True)
    replicas = args.get("replicas")
    options = load_scale_out_config().with_replicas(int(replicas) if replicas is not None else None)
    return build_application(pin_generated_key(settings), options)
