"""The stream client: a LightningDataModule that trains from a live stream, exactly resumable."""

from streamgpt.data.config import RetryConfig, StreamConfig, TokenizerConfig

__all__ = ["RetryConfig", "StreamConfig", "StreamDataModule", "TokenizerConfig"]


def __getattr__(name: str):
    # Lazy: the config schemas are needed to compose a config, Lightning (slow to import) is not.
    if name == "StreamDataModule":
        from streamgpt.data.datamodule import StreamDataModule

        return StreamDataModule
    raise AttributeError(name)
