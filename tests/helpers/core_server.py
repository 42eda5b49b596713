"""A minimal server that speaks only core protocol 1.0 (no extensions), like EIR's reference server.

One shared position for all connections, ids `sample_<position>`, validation ids skipped, no
cursor in replies, no `extensions` in the handshake reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import orjson
from websockets.asyncio.server import serve

from .corpora import text


class CoreOnlyServer:
    def __init__(self, n_samples: int = 400, seed: int = 0) -> None:
        import random

        rng = random.Random(seed)
        self.texts = [text(rng, 200) + "<|endoftext|>" for _ in range(n_samples)]
        self.position = 0
        self.validation: set[str] = set()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = await serve(self._handle, "127.0.0.1", 0, compression=None)
            self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"
            started.set()
            await self.server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(main())

    def _batch(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            i = self.position % len(self.texts)
            sample_id = f"sample_{self.position}"
            self.position += 1
            if sample_id in self.validation:
                continue
            t = self.texts[i]
            out.append(
                {
                    "inputs": {"text_output": t},
                    "target_labels": {"text_output": {"text_output": t}},
                    "sample_id": sample_id,
                }
            )
        return out

    async def _handle(self, ws) -> None:
        hello = orjson.loads(await ws.recv())
        if hello.get("type") != "handshake" or hello.get("version") != "1.0":
            await ws.send(
                orjson.dumps(
                    {"type": "error", "payload": {"message": "Incompatible protocol version"}}
                ).decode()
            )
            return
        await ws.send('{"type": "handshake", "version": "1.0"}')
        async for frame in ws:
            msg = orjson.loads(frame)
            kind = msg.get("type")
            if kind == "getData":
                reply = {"type": "data", "payload": self._batch(msg["payload"]["batch_size"])}
            elif kind == "heartbeat":
                reply = {"type": "heartbeat"}
            elif kind == "getInfo":
                reply = {
                    "type": "info",
                    "payload": {
                        "inputs": {},
                        "outputs": {"text_output": {"type": "sequence", "shape": None}},
                    },
                }
            elif kind == "status":
                reply = {
                    "type": "status",
                    "payload": {"active_connections": 1, "current_position": self.position},
                }
            elif kind == "setValidationIds":
                self.validation = set(msg["payload"]["validation_ids"])
                reply = {
                    "type": "validationIdsConfirmation",
                    "payload": {"message": f"Received {len(self.validation)} validation IDs"},
                }
            elif kind == "reset":
                self.position = 0
                await ws.send(
                    '{"type": "resetConfirmation", "payload": {"message": "Reset successful"}}'
                )
                reply = {"type": "reset", "payload": {"message": "Reset command received"}}
            else:
                continue
            await ws.send(orjson.dumps(reply).decode())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
