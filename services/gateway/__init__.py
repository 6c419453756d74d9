"""The HTTP/JSON gateway: every public Search RPC over HTTP, and a search page."""
