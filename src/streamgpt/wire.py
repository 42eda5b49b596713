"""What the stream client and server agree on, and nothing else: they meet only on the wire.
The protocol itself is described in docs/PROTOCOL.md."""

PROTOCOL_VERSION = "1.0"
EXTENSIONS = ("consumer", "cursor", "validation_split")
