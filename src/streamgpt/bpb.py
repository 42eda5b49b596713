"""Bits per byte: a language model's loss in a unit that does not depend on its tokenizer.

    bpb = sum of NLL (nats) over predicted target tokens / (ln 2 x the UTF-8 bytes they stand for)

A tokenizer with longer tokens has fewer, harder targets: its loss per token is higher for the
same model quality, so val/loss of runs with different vocabularies cannot be compared. The text's
bytes are the same whatever cut it into tokens, so bits per byte can.

Targets that stand for no bytes (special tokens: end-of-text, pad) are left out of both sums, as
nanochat does: they are not text, and a tokenizer that marks documents differently must not score
differently for it. The end-of-text token's NLL still counts in val/loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, pre_tokenizers

LN2 = math.log(2)


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """The UTF-8 bytes each token id stands for (int64, one entry per id), 0 for special tokens.

    In a byte-level BPE every character of a token's string is one byte (GPT-2's ByteLevel
    alphabet maps the 256 bytes to 256 printable characters); a token of another kind of
    tokenizer is measured by its decoded text.
    """
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    lengths = []
    for i in range(tokenizer.get_vocab_size()):
        piece = tokenizer.id_to_token(i)
        if i in special or piece is None:
            lengths.append(0)
        elif all(c in alphabet for c in piece):
            lengths.append(len(piece))
        else:
            lengths.append(len(tokenizer.decode([i], skip_special_tokens=False).encode()))
    return torch.tensor(lengths, dtype=torch.int64)


def nll_sums(
    logits: torch.Tensor, targets: torch.Tensor, byte_lengths: torch.Tensor
) -> torch.Tensor:
    """token_nll_sums of logits (B, T, vocab)."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return token_nll_sums(nll, targets, byte_lengths)


def token_nll_sums(
    nll: torch.Tensor, targets: torch.Tensor, byte_lengths: torch.Tensor
) -> torch.Tensor:
    """[NLL of every target, targets, NLL of the targets that stand for bytes, their bytes]
    (float64, summed over the batch) from each target's NLL (GPT.forward with reduction="none"):
    what a loss and a bits per byte are made of, and what is summed across batches and ranks
    before dividing."""
    nll = nll.flatten().float()
    nbytes = byte_lengths[targets.flatten()]
    return torch.stack(
        [
            nll.sum().double(),
            torch.tensor(float(nll.numel()), dtype=torch.float64, device=nll.device),
            (nll * (nbytes > 0)).sum().double(),
            nbytes.sum().double(),
        ]
    )


def nll_sums_by_group(
    nll: torch.Tensor,
    targets: torch.Tensor,
    byte_lengths: torch.Tensor | None,
    group: torch.Tensor,
    n_groups: int,
) -> torch.Tensor:
    """token_nll_sums of each group of sequences (float64, shape (n_groups, 4)) from each
    target's NLL (B, T): row g sums the sequences whose `group` is g; a sequence of group -1
    counts in none. Without byte lengths the last two columns are 0."""
    nll = nll.view(targets.shape).double()
    nbytes = torch.zeros_like(nll) if byte_lengths is None else byte_lengths[targets].double()
    per_sequence = torch.stack(
        [
            nll.sum(1),
            torch.full_like(nll[:, 0], targets.size(1)),
            (nll * (nbytes > 0)).sum(1),
            nbytes.sum(1),
        ],
        dim=1,
    )
    sums = torch.zeros(n_groups + 1, 4, dtype=torch.float64, device=nll.device)
    sums.index_add_(0, torch.where(group < 0, n_groups, group), per_sequence)
    return sums[:n_groups]


def bits_per_byte(nll_of_byte_targets: float, n_bytes: float) -> float:
    return nll_of_byte_targets / (LN2 * n_bytes) if n_bytes else math.nan
