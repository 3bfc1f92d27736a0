"""The built-in chat page (``GET /``, ``GET /ui/config``) and its one static HTML file."""
