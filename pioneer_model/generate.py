"""Token generation with a key/value cache: sampling, batched generate, streaming, confidence."""

import math
from typing import Iterator

import torch
import torch.nn.functional as F


def sample_next(logits: torch.Tensor, temperature=0.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Pick the next token for each row of (batch, vocab) logits; greedy when temperature <= 0."""
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def confidence(logprobs: list[float]) -> float:
    """Geometric-mean probability of the generated tokens, in [0, 1]; 0 for an empty reply."""
    if not logprobs:
        return 0.0
    return math.exp(sum(logprobs) / len(logprobs))


def fit_prompt(ids: torch.Tensor, max_new_tokens: int, sequence_length: int):
    """Keep the most recent prompt tokens so prompt + new tokens fit the model's positions."""
    max_new_tokens = max(1, min(max_new_tokens, sequence_length - 1))
    return ids[..., -(sequence_length - max_new_tokens):], max_new_tokens


@torch.inference_mode()
def stream_generate(model, input_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
                    eos_token_id=None, generator=None) -> Iterator[tuple[int, float]]:
    """Yield (token id, log-probability under the model) for each new token of one sequence."""
    c = model.config
    eos = c.eos_token_id if eos_token_id is None else eos_token_id
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device).reshape(1, -1)
    if c.decoder_only:
        ids, max_new_tokens = fit_prompt(ids, max_new_tokens, c.sequence_length)
        caches = model.new_kv_caches(1, ids.size(1) + max_new_tokens)
        hidden = model.decode(ids, kv_caches=caches)
        memory_kv = None
    else:
        ids = ids[:, -c.sequence_length:]
        memory_kv = model.cross_kv(model.encode(ids))
        max_new_tokens = max(1, min(max_new_tokens, c.sequence_length - 1))
        caches = model.new_kv_caches(1, 1 + max_new_tokens)
        hidden = model.decode(ids.new_full((1, 1), c.bos_token_id), memory_kv=memory_kv, kv_caches=caches)

    for step in range(max_new_tokens):
        logits = model.logits(hidden[:, -1]).float()
        token = sample_next(logits, temperature, top_k, top_p, generator)
        logprob = F.log_softmax(logits, dim=-1)[0, token].item()
        token_id = token.item()
        yield token_id, logprob
        if token_id == eos or step == max_new_tokens - 1:
            return
        hidden = model.decode(token.view(1, 1), memory_kv=memory_kv, kv_caches=caches)


def generate(model, input_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
             attention_mask=None, generator=None) -> torch.Tensor:
    """Batched generation. attention_mask (batch, seq), 1 = real token, supports left-padded prompts."""
    with torch.inference_mode():
        out = _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                        attention_mask, generator)
    return out.clone()  # a normal tensor, usable with autograd (inference tensors are not)


def _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, attention_mask,
              generator) -> torch.Tensor:
    c = model.config
    eos = c.eos_token_id if eos_token_id is None else eos_token_id
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device)
    if ids.dim() == 1:
        ids = ids[None]
    batch = ids.size(0)
    mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=ids.device).bool()
    if mask is not None and bool(mask.all()):
        mask = None

    memory_kv, memory_mask, positions, attn_mask = None, None, None, None
    if c.decoder_only:
        ids, max_new_tokens = fit_prompt(ids, max_new_tokens, c.sequence_length)
        prompt = ids
        if mask is not None:
            mask = mask[:, -ids.size(1):]
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            t = ids.size(1)
            causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
            # Padding queries attend to themselves only, so no row is fully masked (which would give NaN).
            attn_mask = (causal & mask[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=ids.device)
        caches = model.new_kv_caches(batch, ids.size(1) + max_new_tokens)
        hidden = model.decode(ids, kv_caches=caches, positions=positions, attn_mask=attn_mask)
    else:
        src = ids[:, -c.sequence_length:]
        memory_mask = None if mask is None else mask[:, -c.sequence_length:]
        memory_kv = model.cross_kv(model.encode(src, memory_mask))
        max_new_tokens = max(1, min(max_new_tokens, c.sequence_length - 1))
        prompt = src.new_full((batch, 1), c.bos_token_id)
        caches = model.new_kv_caches(batch, 1 + max_new_tokens)
        hidden = model.decode(prompt, memory_kv=memory_kv, memory_padding_mask=memory_mask, kv_caches=caches)

    out, finished = [prompt], torch.zeros(batch, dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        token = sample_next(model.logits(hidden[:, -1]).float(), temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, c.pad_token_id if eos is None else eos)
        out.append(token[:, None])
        if eos is not None:
            finished |= token == eos
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        step_positions, step_mask = None, None
        if positions is not None:  # left-padded decoder-only prompts
            step_positions = positions[:, -1:] + 1
            positions = torch.cat([positions, step_positions], dim=1)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            step_mask = mask[:, None, None, :]
        hidden = model.decode(token[:, None], memory_kv=memory_kv, memory_padding_mask=memory_mask,
                              kv_caches=caches, positions=step_positions, attn_mask=step_mask)
    return torch.cat(out, dim=1)
