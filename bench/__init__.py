"""Benchmarks of the service against plain faster-whisper; run each as `python -m bench.NAME`."""
