"""The stream server's yaml config (serve.yaml, source/), found by Hydra as pkg://streamgpt.server.conf."""
