"""The Whisper side of Streamscribe: segment transcription and the Modal app that runs it on GPUs."""
