"""HTTP plumbing shared by every route: API keys, errors in one shape, body limits, request ids
and the access log, allowed methods, the OpenAPI document, and running a serving turn over HTTP
(``turns``: open, collect, stream, and the one owner of its cancellation)."""
