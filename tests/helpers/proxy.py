"""A WebSocket proxy in front of a real stream server that can stall or garble what it relays.

mode: "pass" relays both ways; "stall" swallows everything (a server that accepts but stops
answering); "garble_once" replaces the next reply with junk, then relays again; "garble" replaces
every reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

JUNK = "\x00this is not JSON{"


class ChaosProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = await serve(self._handle, "127.0.0.1", 0, compression=None, max_size=None)
            self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"
            ready.set()
            await self.server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(main())

    async def _handle(self, client) -> None:
        self.connections += 1
        async with connect(self.upstream, max_size=None, compression=None) as server:

            async def to_server() -> None:
                async for message in client:
                    if self.mode != "stall":
                        await server.send(message)

            async def to_client() -> None:
                async for message in server:
                    if self.mode == "stall":
                        continue
                    if self.mode.startswith("garble"):
                        if self.mode == "garble_once":
                            self.mode = "pass"
                        message = JUNK
                    await client.send(message)

            tasks = [asyncio.create_task(to_server()), asyncio.create_task(to_client())]
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
