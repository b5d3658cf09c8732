"""The CPU side of Streamscribe: the web service, media handling, fan-out, job store and CLI."""

__version__ = "0.1.0"
