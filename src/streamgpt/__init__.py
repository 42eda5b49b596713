"""streamgpt: train GPT-style language models on text streamed to the trainer over WebSockets."""

__version__ = "0.1.0"
