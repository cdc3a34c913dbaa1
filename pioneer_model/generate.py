"""Token generation with a key/value cache: sampling, batched generate, streaming, confidence."""

import functools
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .graphs import avoid_cudnn_attention, greedy_tokens


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


def decode_step(model, ids, positions, attn_mask, kv_caches, memory_kv=None, memory_padding_mask=None):
    """Next-token logits (batch, vocab) of one step over fixed-shape caches: what compile=True compiles."""
    hidden = model.decode(ids, kv_caches=kv_caches, positions=positions, attn_mask=attn_mask, memory_kv=memory_kv,
                          memory_padding_mask=memory_padding_mask)
    return model.logits(hidden[:, -1])


@functools.cache
def compiled_decode_step():
    return torch.compile(decode_step, dynamic=False)


def start_decoding(model, ids, mask, max_new_tokens, compile=False):
    """Run the prompt; return (kept prompt, max_new_tokens, its next-token logits, step), where step(token) takes
    (batch, 1) ids and returns the next logits (batch, vocab). compile=True: a torch.compile'd step over
    fixed-shape caches, gpt-fast style (one compilation per batch size, cache bucket and source length)."""
    c = model.config
    batch = ids.size(0)
    avoid_cudnn_attention(ids.device)
    memory_kv = memory_mask = positions = attn_mask = None
    if c.decoder_only:
        prompt, max_new_tokens = fit_prompt(ids, max_new_tokens, c.sequence_length)
        if mask is not None:
            mask = mask[:, -prompt.size(1):]
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            t = prompt.size(1)
            causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
            # Padding queries attend to themselves only, so no row is fully masked (which would give NaN).
            attn_mask = (causal & mask[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=ids.device)
    else:
        src = ids[:, -c.sequence_length:]
        memory_mask = None if mask is None else mask[:, -c.sequence_length:]
        memory_kv = model.cross_kv(model.encode(src, memory_mask))
        max_new_tokens = max(1, min(max_new_tokens, c.sequence_length - 1))
        prompt, mask = src.new_full((batch, 1), c.bos_token_id), None
    length = prompt.size(1) + max_new_tokens
    if compile:  # round up, so that most generations share a compiled step
        length = min(-(-length // 128) * 128, c.sequence_length)
    caches = model.new_kv_caches(batch, length)
    hidden = model.decode(prompt, memory_kv=memory_kv, memory_padding_mask=memory_mask, kv_caches=caches,
                          positions=positions, attn_mask=attn_mask)
    logits = model.logits(hidden[:, -1])
    memory = dict(memory_kv=memory_kv, memory_padding_mask=memory_mask)

    if compile:
        index = torch.tensor([prompt.size(1)], device=ids.device)  # the cache slot the next token fills
        for cache in caches:
            cache.write_at(index)
        valid = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=ids.device)
        valid[..., : prompt.size(1)] = True if mask is None else mask[:, None, None, :]
        last = positions[:, -1:].clone() if positions is not None else index.expand(batch, 1) - 1
        step_fn = compiled_decode_step()

        def step(token):
            valid.index_fill_(3, index, True)
            last.add_(1)
            logits = step_fn(model, token, last, valid, caches, **memory)
            index.add_(1)
            return logits

        return prompt, max_new_tokens, logits, step

    def step(token):
        nonlocal positions, mask
        step_positions = step_mask = None
        if positions is not None:  # left-padded decoder-only prompts
            step_positions = positions[:, -1:] + 1
            positions = torch.cat([positions, step_positions], dim=1)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            step_mask = mask[:, None, None, :]
        hidden = model.decode(token, kv_caches=caches, positions=step_positions, attn_mask=step_mask, **memory)
        return model.logits(hidden[:, -1])

    return prompt, max_new_tokens, logits, step


@torch.inference_mode()
def stream_generate(model, input_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
                    eos_token_id=None, generator=None, compile=False) -> Iterator[tuple[int, float]]:
    """Yield (token id, log-probability under the model) for each new token of one sequence."""
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device).reshape(1, -1)
    _, max_new_tokens, logits, step = start_decoding(model, ids, None, max_new_tokens, compile)
    for i in range(max_new_tokens):
        logits = logits.float()
        token = sample_next(logits, temperature, top_k, top_p, generator)
        logprob = F.log_softmax(logits, dim=-1)[0, token].item()
        token_id = token.item()
        yield token_id, logprob
        if token_id == eos or i == max_new_tokens - 1:
            return
        logits = step(token.view(1, 1))


def generate(model, input_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
             attention_mask=None, generator=None, compile=False) -> torch.Tensor:
    """Batched generation. attention_mask (batch, seq), 1 = real token, supports left-padded prompts."""
    with torch.inference_mode():
        out = _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                        attention_mask, generator, compile)
    return out.clone()  # a normal tensor, usable with autograd (inference tensors are not)


def _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, attention_mask,
              generator, compile) -> torch.Tensor:
    c = model.config
    eos = c.eos_token_id if eos_token_id is None else eos_token_id
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device)
    if ids.dim() == 1:
        ids = ids[None]
    mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=ids.device).bool()
    if mask is not None and bool(mask.all()):
        mask = None
    prompt, max_new_tokens, logits, step = start_decoding(model, ids, mask, max_new_tokens, compile)
    if compile and ids.is_cuda and (temperature is None or temperature <= 0):  # no host work per token
        return torch.cat([prompt, greedy_tokens(step, logits, max_new_tokens, eos)], dim=1)

    out, finished = [prompt], torch.zeros(ids.size(0), 1, dtype=torch.bool, device=ids.device)
    for i in range(max_new_tokens):
        token = sample_next(logits.float(), temperature, top_k, top_p, generator)[:, None]
        token = token.masked_fill(finished, c.pad_token_id if eos is None else eos)
        out.append(token)
        if eos is not None:
            finished |= token == eos
        if i == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = step(token)
    return torch.cat(out, dim=1)
