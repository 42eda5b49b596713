"""The stream client: a LightningDataModule that trains from a live stream, exactly resumable."""

from streamgpt.data.config import RetryConfig, StreamConfig, TokenizerConfig
from streamgpt.data.datamodule import StreamDataModule

__all__ = ["RetryConfig", "StreamConfig", "StreamDataModule", "TokenizerConfig"]
