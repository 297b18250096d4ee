"""forward: an HTTPS/WSS front end that relays browser WebSocket sessions to Rserve."""

__version__ = "0.1.0"
