"""Normalised token grid -> PEFT state dict in one gather and one multiply-add (``DecodePlan``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DecodePlan:
    """Normalised tokens (T, h, w) -> the PEFT state dict in one gather and one multiply-add.

    ``index`` lists, for every weight of the adapter in state-dict order (each A (r, in), then B
    (out, r), module by module), its position in the flattened grid; it is computed by running
    ``tokens_to_state_dict`` once on a grid of positions, so it is the tokenizer's own mapping.
    ``scale`` and ``shift`` are the normaliser's std and (masked) mean at those positions: the
    weights are ``tokens[index] * scale + shift``, which is ``denormalize`` + ``tokens_to_state_dict``
    without the intermediate grid and the per-module slicing.
    """

    index: object        # (P,) int32 positions in the flattened (T*h*w) grid
    scale: object        # (P,) float32
    shift: object        # (P,) float32
    keys: list
    shapes: list
    sizes: list

    @classmethod
    def build(cls, layout, normalizer) -> "DecodePlan":
        import torch

        from generator.tokenizer import tokens_to_state_dict

        T, h, w = layout.shape
        if T * h * w >= 2 ** 31:
            raise ValueError(f"token grid {layout.shape} is too large for int32 positions")
        positions = torch.arange(T * h * w, dtype=torch.int32).reshape(T, h, w)  # (T, h, w)
        mapped = tokens_to_state_dict(positions, layout, dtype=torch.int32)
        keys = list(mapped)
        index = torch.cat([mapped[k].reshape(-1) for k in keys])  # (P,)
        token = torch.div(index, h * w, rounding_mode="floor")    # (P,) the token each weight lies in
        scale = normalizer.std.float().index_select(0, token)
        mean = normalizer.mean.float()
        shift = mean.index_select(0, token) if mean.ndim == 1 else mean.reshape(-1).index_select(0, index)
        if normalizer.mask is not None:  # denormalize zeroes padding (real weights never are: a no-op here)
            shift = shift * normalizer.mask.reshape(-1).index_select(0, index)
        return cls(index=index, scale=scale, shift=shift, keys=keys,
                   shapes=[tuple(mapped[k].shape) for k in keys], sizes=[mapped[k].numel() for k in keys])

    def state_dict(self, tokens, dtype=None) -> dict:
        """Normalised tokens (T, h, w) -> {key: weight}; the weights share one buffer (views)."""
        import torch

        flat = tokens.detach().cpu().contiguous().reshape(-1)  # (T*h*w,) in the decoder's dtype
        values = torch.addcmul(self.shift, flat.index_select(0, self.index).float(), self.scale)  # (P,)
        if dtype is not None and dtype != values.dtype:
            values = values.to(dtype)
        return {key: part.view(shape) for key, part, shape in zip(self.keys, values.split(self.sizes), self.shapes)}
