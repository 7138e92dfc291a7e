"""The HTTP and WebSocket interface: the only layer that uses aiohttp's server side."""
