"""Run the stream server: `python scripts/serve.py [...]` is `python -m streamgpt.server [...]`.

Every option is in src/streamgpt/server/conf/ (serve.yaml and source/); `--help` lists them.
"""

from streamgpt.server.__main__ import main

if __name__ == "__main__":
    main()
