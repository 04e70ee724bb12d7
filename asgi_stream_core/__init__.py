"""The rooms of asgi-stream behind `asgi_stream.py` (its docstring gives the
reading order). What a user imports is `asgi_stream` (`app`, `Gateway`,
`main`); the names in here are the gateway's own and may change."""
