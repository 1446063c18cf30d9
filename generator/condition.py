"""The DnD condition: N prompts -> the frozen encoder's token-level last hidden state (N, L, C).

Each prompt's token embeddings (the sentence-transformer's ``token_embeddings``, i.e. the
transformer's last hidden state before pooling) are cut to L tokens or zero-padded up to L.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def pad_or_cut(sequences: Sequence[Tensor], length: int) -> Tensor:
    """A list of (len_i, C) tensors -> (N, L, C): cut to L or zero-padded on the right."""
    if not sequences:
        raise ValueError("no sequences to pad")
    first = sequences[0]
    out = torch.zeros(len(sequences), length, first.shape[-1], dtype=torch.float32,
                      device=first.device)  # (N, L, C)
    for i, seq in enumerate(sequences):
        n = min(length, seq.shape[0])
        out[i, :n] = seq[:n].float()  # copying also turns inference tensors into normal ones
    return out


def encode_prompt_tokens(encoder, prompts: Sequence[str], max_tokens: int = 64,
                         batch_size: int = 32) -> Tensor:
    """Embed prompts with a frozen sentence-transformers encoder: (N, L, C) on the encoder's device."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    with torch.no_grad():
        token_embeddings = encoder.encode(prompts, output_value="token_embeddings",
                                          batch_size=batch_size, show_progress_bar=False,
                                          convert_to_numpy=False)
        token_embeddings = [torch.as_tensor(t) for t in token_embeddings]  # N x (len_i, C)
        return pad_or_cut(token_embeddings, max_tokens)  # (N, L, C)
