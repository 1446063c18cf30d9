"""Language-model plumbing shared by harvesting and the generators' SFT objective: one chat-rendered
example -> token ids with its prompt length, a right-padded batch with answer-only labels, and the
next-token loss on answer tokens (the LM head applied only where labels exist)."""

from __future__ import annotations

from registry.chat import render_example, render_prompt


def encode_example(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of the chat-rendered example and how many leading ids are prompt (no loss).

    The answer part is what the template puts after the generation prompt (answer + end-of-turn),
    minus trailing whitespace; the prompt is cut from the left if the whole is too long.
    """
    prompt_text = render_prompt(tokenizer, prompt)
    answer_text = None
    full = render_example(tokenizer, prompt, answer)
    if full is not None and full.startswith(prompt_text):
        answer_text = full[len(prompt_text):].rstrip()
    if answer_text is None:
        answer_text = answer + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[:max_length - 1]
    keep = max(1, max_length - len(answer_ids))
    prompt_ids = prompt_ids[-keep:]
    return prompt_ids + answer_ids, len(prompt_ids)


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading token ids every sequence shares, leaving at least one id of each unshared."""
    if not sequences:
        return 0
    limit = min(len(seq) for seq in sequences) - 1
    length = 0
    while length < limit and all(seq[length] == sequences[0][length] for seq in sequences):
        length += 1
    return length


def collate(encoded: list[tuple[list[int], int]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside answers)."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, attention, labels  # (B, T) each


def answer_loss(model):
    """``loss(input_ids, attention_mask, labels)`` for a plain causal LM (LoRA layers or hooks may
    sit inside it): the body runs once and the LM head only on answer positions, when the model's
    head is a plain projection; otherwise the full forward."""
    import torch.nn.functional as F

    config = model.config
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    plain_head = (
        body is not None and head is not None
        and not getattr(config, "final_logit_softcapping", None)
        and getattr(config, "logit_scale", None) in (None, 1, 1.0)
        and getattr(config, "logits_scaling", None) in (None, 1, 1.0)
    )

    def loss(input_ids, attention_mask, labels):
        targets = labels[:, 1:]  # position t predicts token t+1
        mask = targets != -100  # (B, T-1)
        if plain_head:
            hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
            logits = head(hidden[:, :-1][mask])  # (n_answer_tokens, V)
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
        return F.cross_entropy(logits.float(), targets[mask])

    return loss


def use_training_attention(model, device) -> None:
    """On CPU, train with the plain ``eager`` attention: its backward is cheaper than SDPA's for short
    padded batches (measured for the harvest: 1.81 vs 2.43 s/step in bf16); elsewhere keep the model's."""
    if str(device).startswith("cpu") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


def lora_scaling(peft_config) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (one rank and alpha for all modules)."""
    from registry.errors import RegistryError

    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise RegistryError("this needs one rank and alpha for every module (no rank/alpha patterns)")
    rank, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    return alpha / (rank ** 0.5 if peft_config.get("use_rslora") else rank)


def add_low_rank(output, x, a, b, scaling: float):
    """``output + scaling * (x A^T) B^T`` as one rank-r matmul and one fused ``addmm``, in ``output``'s dtype.

    ``output`` (..., out), ``x`` (..., in), ``a`` (r, in), ``b`` (out, r); ``a``/``b`` may be fp32 master
    weights (cast here, so gradients reach them). Written out, the update costs a full-width scale, an
    add and (under bf16) two casts of the (..., out) activations per layer: on a bf16 CPU harvest step
    of SmolLM2 these were a third of the time (torch.profiler: the (328, 8) @ (8, 1536) product, its
    scalar ``mul``, ``add`` and ``copy_`` of (8, 41, 1536) took 4x the base projection's time).
    """
    dtype = output.dtype
    h = x.to(dtype) @ a.to(dtype).T  # (..., r)
    flat = output.reshape(-1, output.shape[-1])  # (N, out)
    return flat.addmm(h.reshape(-1, h.shape[-1]), b.to(dtype).T, alpha=scaling).view(output.shape)


def lean_lora_layers(peft_model) -> int:
    """Give the PEFT model's plain LoRA linears a forward that adds the update with :func:`add_low_rank`.

    Only layers whose every adapter is vanilla LoRA (no DoRA or other variant) change, and the new
    forward falls back to PEFT's own for anything else it supports (disabled or merged adapters,
    mixed-batch ``adapter_names``). The weights, their names and the saved adapters are PEFT's.
    Returns the model."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear

    def forward(self, x, *args, **kwargs):
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return LoraLinear.forward(self, x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        for name in self.active_adapters:
            if name in self.lora_A:
                result = add_low_rank(result, self.lora_dropout[name](x), self.lora_A[name].weight,
                                      self.lora_B[name].weight, self.scaling[name])
        return result

    for module in peft_model.modules():
        if type(module) is LoraLinear and not getattr(module, "lora_variant", None):
            module.forward = types.MethodType(forward, module)
    return peft_model


def contiguous_head_input(model):
    """Make the LM head's input contiguous before the projection (idempotent; returns ``model``).

    Generation computes the prompt's logits on ``hidden[:, -1:, :]``, a strided view when the batch
    has more than one row, and torch 2.13's CPU ``linear`` then takes a batched path that copies the
    (vocab x hidden) weight once per row: (64, 1, 576) x (49152, 576) in bf16 took 11.8 s strided and
    14 ms contiguous on one thread (16 rows: 2.2 s), once per decoded batch.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_registry_contiguous_input", False):
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
        head._registry_contiguous_input = True
    return model
