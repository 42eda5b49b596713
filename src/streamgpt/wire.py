"""What the stream client and server agree on, and nothing else: they meet only on the wire.
The protocol itself is described in docs/PROTOCOL.md."""

PROTOCOL_VERSION = "1.0"
EXTENSIONS = ("consumer", "cursor", "validation_split", "tokens")

# Tokens on the wire (PROTOCOL.md §3.11): a token frame is TOKEN_FRAME_MAGIC, the length of its JSON
# header as a little-endian u32, the header (space-padded so the ids start at a multiple of 4
# bytes), then the token ids, little-endian, of the header's dtype.
TOKEN_FRAME_MAGIC = b"SGT1"
TOKEN_DTYPES = {"uint16": "<u2", "uint32": "<u4"}
