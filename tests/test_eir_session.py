"""EIR's own client session against our server, message by message, with EIR's timeouts.

The client side is written with websocket-client, the library `eirtrain` uses, and follows the
order of PROTOCOL.md's "What EIR's client does": status, gather (probe, getInfo, getData until the
setup samples are saved), reset (exactly two replies), status, setValidationIds, then training
(probe, heartbeat, pipelined heartbeat + getData whose backlog grows by one per batch).
"""

from __future__ import annotations

import json
import random
import threading

import pytest
import websocket

PROBE_TIMEOUT = 5  # every reply of EIR's protocol validation
TIMEOUT = 30  # every other reply
SAMPLE_KEYS = {"inputs", "target_labels", "sample_id"}


class EirPeer:
    """One EIR-style connection: handshake on open, replies read with EIR's timeouts."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, skip_utf8_validation=True)
        self.send({"type": "handshake", "version": "1.0", "worker_id": 0})
        reply = self.recv(TIMEOUT)
        assert reply["type"] == "handshake" and reply["version"] == "1.0", reply

    def send(self, message: dict) -> None:
        self.ws.send(json.dumps(message))

    def recv(self, timeout: float) -> dict:
        self.ws.settimeout(timeout)
        _, data = self.ws.recv_data()
        return json.loads(data)

    def expect(self, message: dict, reply_type: str, timeout: float = TIMEOUT) -> dict:
        self.send(message)
        reply = self.recv(timeout)
        assert reply["type"] == reply_type, f"{message['type']} answered with {reply}"
        return reply

    def probe(self) -> None:
        """EIR's validate_server_protocol: getInfo, getData(1), heartbeat, reset; 5 s each."""
        self.expect({"type": "getInfo"}, "info", PROBE_TIMEOUT)
        self.expect({"type": "getData", "payload": {"batch_size": 1}}, "data", PROBE_TIMEOUT)
        self.expect({"type": "heartbeat"}, "heartbeat", PROBE_TIMEOUT)
        self.send({"type": "reset"})
        replies = [self.recv(PROBE_TIMEOUT)["type"] for _ in range(2)]
        assert replies == ["resetConfirmation", "reset"]

    def nothing_pending(self) -> bool:
        """No unsolicited message (such as another client's reset broadcast) is waiting."""
        try:
            self.recv(0.3)
        except websocket.WebSocketTimeoutException:
            return True
        return False

    def close(self) -> None:
        self.ws.close()


def check_sample(sample: dict) -> str:
    assert set(sample) == SAMPLE_KEYS
    text = sample["inputs"]["text_output"]
    assert isinstance(text, str) and text
    assert sample["target_labels"] == {"text_output": {"text_output": text}}
    return sample["sample_id"]


def eir_session(url: str, setup_samples: int, batch: int, valid: int, steps: int, seed: int):
    peer = EirPeer(url)  # 1. status
    status = peer.expect({"type": "status", "payload": {}}, "status")
    assert status["payload"]["extensions"]
    peer.close()

    peer = EirPeer(url)  # 2. gather the setup samples
    peer.probe()
    assert peer.nothing_pending()
    info = peer.expect({"type": "getInfo"}, "info")["payload"]
    assert info == {"inputs": {}, "outputs": {"text_output": {"type": "sequence", "shape": None}}}
    setup = []
    while len(setup) < setup_samples:
        reply = peer.expect({"type": "getData", "payload": {"batch_size": batch}}, "data")
        assert len(reply["payload"]) == batch
        setup += [check_sample(s) for s in reply["payload"]]
    setup = setup[:setup_samples]
    peer.close()

    peer = EirPeer(url)  # 3. reset: EIR reads exactly two replies
    peer.send({"type": "reset", "payload": {}})
    assert [peer.recv(TIMEOUT)["type"] for _ in range(2)] == ["resetConfirmation", "reset"]
    assert peer.nothing_pending()
    peer.close()

    peer = EirPeer(url)  # 4. status again
    peer.expect({"type": "status", "payload": {}}, "status")
    peer.close()

    validation = random.Random(seed).sample(sorted(setup), valid)  # 5. validation ids
    peer = EirPeer(url)
    reply = peer.expect(
        {"type": "setValidationIds", "payload": {"validation_ids": validation}},
        "validationIdsConfirmation",
    )
    assert reply["payload"]["message"] == f"Received {valid} validation IDs"
    peer.close()

    peer = EirPeer(url)  # 6. training: probe, one heartbeat, then EIR's fetch loop
    peer.probe()
    peer.send({"type": "heartbeat"})
    trained: list[list[str]] = []
    while len(trained) < steps:
        peer.send({"type": "heartbeat"})
        peer.send({"type": "getData", "payload": {"batch_size": batch}})
        reply = peer.recv(TIMEOUT)
        if reply["type"] == "heartbeat":
            continue  # EIR re-sends a request pair here: the backlog grows
        assert reply["type"] == "data", reply
        assert len(reply["payload"]) == batch
        trained.append([check_sample(s) for s in reply["payload"]])
    peer.close()
    return setup, validation, trained


def test_two_eir_sessions_at_once_are_served_message_by_message(serve, shakespeare):
    server = serve(shakespeare)
    results, errors = {}, []

    def run(name: str, seed: int) -> None:
        try:
            results[name] = eir_session(
                server.url, setup_samples=96, batch=16, valid=24, steps=40, seed=seed
            )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", 0), ("b", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    assert set(results) == {"a", "b"}
    all_validation = set(results["a"][1]) | set(results["b"][1])
    for _setup, validation, trained in results.values():
        # Core clients share one stream and each probe's reset rewinds it for everyone (EIR's
        # reference semantics), so two runs may see a sample twice; a batch never does.
        assert all(len(batch) == len(set(batch)) for batch in trained)
        flat = [i for batch in trained for i in batch]
        assert not set(validation) & set(flat), "a validation id reached training"
        assert not all_validation & set(flat[-200:]), "after both runs sent their ids"


def test_after_a_reset_the_stream_replays_the_setup_samples_with_the_same_ids(
    serve, client, shakespeare
):
    server = serve(shakespeare)
    first = client(server.url).data(50)
    peer = EirPeer(server.url)
    peer.send({"type": "reset"})
    assert [peer.recv(TIMEOUT)["type"] for _ in range(2)] == ["resetConfirmation", "reset"]
    peer.close()
    again = client(server.url).data(50)
    assert again["payload"] == first["payload"], "ids stay aligned with content after a reset"


def test_validation_ids_are_skipped_and_the_batch_is_filled_from_later_samples(
    serve, client, shakespeare
):
    server = serve(shakespeare)
    first = [s["sample_id"] for s in client(server.url).data(40)["payload"]]
    c = client(server.url)
    c.ask({"type": "setValidationIds", "payload": {"validation_ids": first[5:15]}})
    c.ask({"type": "reset"})
    c.recv()
    batch = [s["sample_id"] for s in c.data(40)["payload"]]
    assert len(batch) == 40
    assert batch[:5] == first[:5] and batch[5:30] == first[15:40]
    assert not set(batch) & set(first[5:15])


@pytest.mark.parametrize("max_samples", [100])
def test_an_eir_run_that_reaches_the_end_exits_cleanly(serve, shakespeare, max_samples):
    server = serve(shakespeare, max_samples=max_samples)
    peer = EirPeer(server.url)
    peer.probe()  # uses one sample
    got = 0
    while True:
        reply = peer.expect({"type": "getData", "payload": {"batch_size": 16}}, "data")
        if reply["payload"] == ["terminate"]:
            break
        assert "terminate" not in reply["payload"], "terminate is never mixed with samples"
        got += len(reply["payload"])
    assert got == max_samples - 1
    # EIR then reconnects once and runs its probe: the connection must stay usable throughout,
    # and the probe's reset must not undo the end.
    retry = EirPeer(server.url)
    retry.expect({"type": "getInfo"}, "info", PROBE_TIMEOUT)
    reply = retry.expect({"type": "getData", "payload": {"batch_size": 1}}, "data", PROBE_TIMEOUT)
    assert reply["payload"] == ["terminate"]
    retry.expect({"type": "heartbeat"}, "heartbeat", PROBE_TIMEOUT)
    retry.send({"type": "reset"})
    assert [retry.recv(PROBE_TIMEOUT)["type"] for _ in range(2)] == ["resetConfirmation", "reset"]
    reply = retry.expect({"type": "getData", "payload": {"batch_size": 16}}, "data")
    assert reply["payload"] == ["terminate"]
    assert retry.expect({"type": "status", "payload": {}}, "status")["payload"]["ended"]
    peer.close()
    retry.close()
