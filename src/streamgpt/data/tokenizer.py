"""Tokenizers (Hugging Face `tokenizers`): a byte-level BPE trained on streamed text, the bare
bytes (no training), or a file.

Byte-level, so any text encodes without unknown tokens; GPT-2's pre-tokenizer, so the server's
chunks (split right after a word) tokenize exactly as the whole document would. The end-of-text
token separates documents in packed training windows.
"""

from __future__ import annotations

import re
import shutil
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from streamgpt.atomic import replacing


def train_bpe(
    texts: list[str], vocab_size: int, min_frequency: int, eos: str, pad: str
) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos, pad],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The end marker is a special token, not text to learn merges from.
    tok.train_from_iterator((t.replace(eos, " ") for t in texts), trainer, length=len(texts))
    return tok


def byte_symbols() -> list[str]:
    """The character GPT-2's byte-level alphabet writes for each byte 0-255: itself if printable,
    else 256 + n for the n-th unprintable byte (ByteLevel.alphabet(), in byte order)."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    unprintable = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(unprintable)) for b in range(256)]


def byte_tokenizer(eos: str, pad: str) -> Tokenizer:
    """Every UTF-8 byte a token whose id is its value (0-255), then eos (256) and pad (257): a
    byte-level BPE with no merges, so bits per byte, decoding and the server read it as any other
    (character-level on ASCII text, as nanoGPT's shakespeare_char)."""
    vocab = {symbol: b for b, symbol in enumerate(byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No merges: where the text is split cannot change its tokens, so it is not split at all.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([eos, pad])
    return tok


def load(path: str | Path, eos: str) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (tokenizer.path)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({e})") from None
    if tok.token_to_id(eos) is None:
        specials = [t.content for t in tok.get_added_tokens_decoder().values()]
        raise ValueError(
            f"{path} has no end-of-text token {eos!r}; its special tokens are {specials}: "
            "set tokenizer.eos_token to one of them"
        )
    return tok


def build(cfg: Any, run_dir: Path, sample_texts: Callable[[], list[str]]) -> Path:
    """The run's tokenizer.json: reused if the run folder has one (a resume), else built."""
    target = Path(run_dir) / "tokenizer.json"
    if target.exists():
        load(target, cfg.eos_token)
        return target
    with replacing(target) as tmp:  # a crash never leaves a half-written tokenizer.json
        _make(cfg, tmp, sample_texts)
    return target


def _make(cfg: Any, tmp: Path, sample_texts: Callable[[], list[str]]) -> None:
    """Write the tokenizer `cfg` asks for (checked by config.validate) to `tmp`."""
    if cfg.name == "pretrained":
        path = locate(cfg.path)
        load(path, cfg.eos_token)  # the file's content: a tokenizer, with the eos token
        shutil.copyfile(path, tmp)
        return
    if cfg.name == "bytes":  # nothing to learn: no samples are streamed for it
        byte_tokenizer(cfg.eos_token, cfg.pad_token).save(str(tmp))
        return
    texts = sample_texts()
    if not texts:
        raise ValueError(
            "no samples to train the tokenizer on (data.stream.streaming_setup_samples)"
        )
    tok = train_bpe(texts, cfg.vocab_size, cfg.min_frequency, cfg.eos_token, cfg.pad_token)
    tok.save(str(tmp))


# -- checking the tokenizer group ----------------------------------------------------------------


NAMES = ("bpe", "bytes", "pretrained")


def check_config(tok: Any, stream: Any) -> None:
    """The tokenizer group (and the samples a BPE trains on): one line naming the key."""
    if tok.name not in NAMES:
        raise ValueError(f"tokenizer.name must be bpe, bytes or pretrained, got {tok.name!r}")
    if tok.name == "bytes":
        return  # nothing to check: always 256 bytes + eos + pad, nothing trained
    if tok.name == "pretrained":
        if not tok.path:
            raise ValueError(
                "tokenizer=pretrained needs tokenizer.path=<tokenizer.json, a folder holding "
                "one, or a Hugging Face hub name such as gpt2>"
            )
        if not Path(tok.path).exists() and not is_hub_name(tok.path):
            raise ValueError(
                f"tokenizer.path={tok.path}: no such file or folder (nor a hub name such as gpt2)"
            )
        return
    for key, value, ok, accepted in (
        ("tokenizer.min_frequency", tok.min_frequency, tok.min_frequency > 0, "positive"),
        (
            "tokenizer.vocab_size",
            tok.vocab_size,
            tok.vocab_size >= 258,
            ">= 258 (256 bytes + 2 special tokens)",
        ),
        (
            "data.stream.streaming_setup_samples",
            stream.streaming_setup_samples,
            stream.streaming_setup_samples >= 1,
            "positive (the BPE tokenizer is trained on them)",
        ),
    ):
        if not ok:
            raise ValueError(f"{key} must be {accepted}, got {value!r}")


# -- pretrained tokenizers: a file, a folder, or a Hugging Face hub name --------------------------

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_name(path: str) -> bool:
    """'gpt2', 'openai-community/gpt2': a hub repository, not a file name (no .json, no ./)."""
    return bool(HUB_NAME.fullmatch(path)) and not path.endswith(".json")


def locate(path: str) -> Path:
    """The tokenizer.json that tokenizer.path names: a file, a folder holding one (a Hugging Face
    model folder), or a hub repository (downloaded once into the Hugging Face cache)."""
    local = Path(path)
    if local.is_file():
        return local
    if local.is_dir():
        if not (local / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer.path={path}: the folder has no tokenizer.json")
        return local / "tokenizer.json"
    return _from_hub(path)


def _from_hub(name: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    endpoint = constants.ENDPOINT
    try:
        # Offline (HF_HUB_OFFLINE=1, or no answer from the hub): only the local cache.
        offline = constants.HF_HUB_OFFLINE or not _reachable(endpoint)
        return Path(hf_hub_download(name, "tokenizer.json", local_files_only=offline))
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        if not offline:
            raise ValueError(
                f"tokenizer.path={name}: the Hugging Face hub has no tokenizer.json for it "
                f"({type(e).__name__}); check the name, or give a local tokenizer.json or folder"
            ) from None
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{endpoint} does not answer"
    raise ValueError(
        f"tokenizer.path={name}: not a local file or folder, the Hugging Face hub cannot be "
        f"reached ({why}) and it is not in the local Hugging Face cache; give a local "
        "tokenizer.json or folder, or run once where the hub answers (it is cached)"
    )


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` (DNS included)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True
