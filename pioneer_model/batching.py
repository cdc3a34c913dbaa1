"""Continuous batching: a batch KV cache with a length per row, and a decoder that admits and retires rows."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .generate import fit_prompt, sample_next
from .graphs import avoid_cudnn_attention


@dataclass
class Sequence:
    """One request in a batch: prompt, sampling settings, stop conditions and the tokens made so far."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None
    generator: torch.Generator | None = None
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # cached (k, v) chunks of the prompt's start,
    # each (layers, heads, chunk, head_dim); dropped once copied into the batch's cache
    memory: torch.Tensor | None = None  # encoder-decoder: the encoder output (1, S, dim), if already known
    reused: int = 0  # prompt tokens whose keys/values (or encoder output) came from a cache
    prefix_write: tuple | None = None  # copied keys/values of new prompt chunks, for the server to cache
    hold_reply_write: bool = False  # the server keeps a finished reply's prefix_write until told to write it
    tokens: list[int] = field(default_factory=list)
    row: int = -1
    done: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature <= 0

    @property
    def reserved(self) -> int:
        """KV positions this sequence may occupy."""
        return len(self.prompt) + self.max_new_tokens

    @property
    def prefix_len(self) -> int:
        return sum(k.size(2) for k, _ in self.prefix or ())


def make_sequence(config, ids, max_new_tokens: int, **kwargs) -> Sequence:
    """A Sequence whose prompt and length are fitted to the model's positions exactly as stream_generate does."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if config.decoder_only:
        ids, max_new_tokens = fit_prompt(ids, max_new_tokens, config.sequence_length)
    else:
        ids, max_new_tokens = ids[-config.sequence_length:], max(1, min(max_new_tokens, config.sequence_length - 1))
    return Sequence(ids.tolist(), max_new_tokens, **kwargs)


class RowCache:
    """One layer's cache seen as a batch of the rows `first`.. (as many as the prefill's batch), each filled from
    the same position `length` on, for prefilling those rows (the KVCache interface)."""

    def __init__(self, kv: torch.Tensor, first: int, length: int = 0):
        self.kv, self.first, self.length = kv, first, length  # kv: (2, rows, heads, max_len, head_dim)

    def append(self, kv_new: torch.Tensor):
        start, end = self.length, self.length + kv_new.size(3)
        if end > self.kv.size(3):
            raise ValueError(f"KV cache overflow: {end} positions > {self.kv.size(3)}")
        rows = slice(self.first, self.first + kv_new.size(1))
        self.kv[:, rows, :, start:end] = kv_new
        self.length = end
        return self.kv[:, rows, :, :end].unbind(0)


class StepCache:
    """One layer's cache for a decoding step of rows 0..n-1: row i's new key/value goes to position pos[i]."""

    def __init__(self, kv: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, same_pos: int | None, width: int):
        self.kv, self.rows, self.pos, self.same_pos, self.width = kv, rows, pos, same_pos, width

    def append(self, kv_new: torch.Tensor):
        n = self.rows.size(0)
        if self.same_pos is not None:  # every row at one position: a plain copy
            self.kv[:, :n, :, self.same_pos] = kv_new[:, :, :, 0]
        else:
            self.kv[:, self.rows, :, self.pos] = kv_new[:, :, :, 0].transpose(0, 1)
        return self.kv[:, :n, :, :self.width].unbind(0)


class BatchKVCache:
    """Keys and values of up to `rows` sequences for every layer, (layers, 2, rows, heads, max_len, head_dim)."""

    def __init__(self, layers, rows, heads, max_len, head_dim, dtype=torch.float32, device=None):
        self.kv = torch.zeros(layers, 2, rows, heads, max_len, head_dim, dtype=dtype, device=device)
        self.lengths = [0] * rows
        self._rows = torch.arange(rows, device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def row_caches(self, first: int, length: int = 0) -> list[RowCache]:
        return [RowCache(layer, first, length) for layer in self.kv]

    def step_caches(self, pos: torch.Tensor, width: int, same_pos: int | None) -> list[StepCache]:
        rows = self._rows[:pos.size(0)]
        return [StepCache(layer, rows, pos, same_pos, width) for layer in self.kv]

    def write(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put known keys and values (layers, heads, T, head_dim) at positions start..start + T of a row."""
        end = start + k.size(2)
        self.kv[:, 0, row, :, start:end] = k.to(self.kv.device, self.kv.dtype)
        self.kv[:, 1, row, :, start:end] = v.to(self.kv.device, self.kv.dtype)

    def read(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[:, 0, row, :, start:end], self.kv[:, 1, row, :, start:end]

    def move(self, src: int, dst: int) -> None:
        end = self.lengths[src]
        self.kv[:, :, dst, :, :end] = self.kv[:, :, src, :, :end]
        self.lengths[dst] = end


class BatchDecoder:
    """Decodes many sequences together. Each new sequence is prefilled alone into a free row, then every
    step() advances all active rows by one token with their own positions and key masks; finished rows leave
    and the last row moves into the gap, so the active rows are always 0..n-1. Not thread-safe: one caller."""

    def __init__(self, model, max_batch_size: int = 16, on_prefill=None, on_done=None):
        self.model, self.max_batch_size = model, max_batch_size
        self.on_prefill = on_prefill  # called with each sequence right after its prefill, while its row is set
        self.on_done = on_done  # called with each sequence that finished (not one removed early), before it leaves
        self.active: list[Sequence] = []
        self.cache: BatchKVCache | None = None
        self.cross: BatchKVCache | None = None  # encoder-decoder: cross-attention keys/values per row

    @property
    def free(self) -> int:
        return self.max_batch_size - len(self.active)

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in (self.cache, self.cross) if c is not None)

    def _allocate(self) -> None:
        c, m = self.model.config, self.model
        avoid_cudnn_attention(m.device)  # every step's keys are one longer
        args = (c.num_decoder_layers, self.max_batch_size, c.attention_heads, c.sequence_length, c.head_dim,
                m.tok_emb.weight.dtype, m.device)
        self.cache = BatchKVCache(*args)
        if not c.decoder_only:
            self.cross = BatchKVCache(*args)

    @torch.inference_mode()
    def add(self, seq: Sequence) -> tuple[int, float]:
        """Prefill a new sequence into a free row; returns its first token and log-probability."""
        self._make_room(1)
        model, c = self.model, self.model.config
        row, device = len(self.active), model.device
        if c.decoder_only:
            start = 0
            for k, v in seq.prefix or ():
                self.cache.write(row, start, k, v)
                start += k.size(2)
            seq.prefix = None  # copied: let the fetched buffers go
            ids = torch.tensor([seq.prompt[start:]], dtype=torch.long, device=device)
            hidden = model.decode(ids, kv_caches=self.cache.row_caches(row, start))
            self.cache.lengths[row] = len(seq.prompt)
        else:
            src = torch.tensor([seq.prompt], dtype=torch.long, device=device)
            if seq.memory is None:
                seq.memory = model.encode(src)
            memory_kv = model.cross_kv(seq.memory.to(device, self.cache.kv.dtype))
            self.cross.write(row, 0, torch.cat([k for k, _ in memory_kv]), torch.cat([v for _, v in memory_kv]))
            self.cross.lengths[row] = src.size(1)
            bos = src.new_full((1, 1), c.bos_token_id)
            hidden = model.decode(bos, memory_kv=memory_kv, kv_caches=self.cache.row_caches(row))
            self.cache.lengths[row] = 1
        return self._join([seq], hidden[:, -1])[0]

    @torch.inference_mode()
    def add_many(self, seqs: list[Sequence]) -> list[tuple[int, float]]:
        """Prefill new sequences of a decoder-only model, none with a cached prefix, together: their prompts are
        right-padded into one forward pass (a padded position comes after every real one, so causal attention
        keeps it from them), and each row's first token comes from its own last prompt position. Returns each
        one's first token and log-probability."""
        model, c = self.model, self.model.config
        if not c.decoder_only or any(s.prefix for s in seqs):
            raise ValueError("add_many prefills decoder-only sequences without a cached prefix: use add()")
        self._make_room(len(seqs))
        first, device = len(self.active), model.device
        lengths = torch.tensor([len(s.prompt) for s in seqs], device=device)
        ids = torch.full((len(seqs), int(lengths.max())), c.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s.prompt)] = torch.tensor(s.prompt)
            self.cache.lengths[first + i] = len(s.prompt)
        hidden = model.decode(ids.to(device), kv_caches=self.cache.row_caches(first))
        return self._join(seqs, hidden[torch.arange(len(seqs), device=device), lengths - 1])

    def _make_room(self, n: int) -> None:
        if self.free < n:
            raise RuntimeError("not enough free rows in the batch")
        if self.cache is None:
            self._allocate()

    def _join(self, seqs: list[Sequence], last_hidden: torch.Tensor) -> list[tuple[int, float]]:
        """Prefilled sequences take the next rows and sample their first tokens from last_hidden (n, dim)."""
        for s in seqs:
            s.row, s.tokens, s.done = len(self.active), [], False
            self.active.append(s)
            if self.on_prefill is not None:
                self.on_prefill(s)
        results = self._sample(seqs, self.model.logits(last_hidden).float())
        for s in seqs:
            if s.done:
                self._retire(s)
        return results

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int, float]]:
        """One decoding step for every active row: (sequence, token, log-probability), finished ones removed."""
        if not self.active:
            return []
        model, c, device = self.model, self.model.config, self.model.device
        n = len(self.active)
        lengths = self.cache.lengths[:n]
        pos = torch.tensor(lengths, dtype=torch.long, device=device)
        width = max(lengths) + 1
        tokens = torch.tensor([[s.tokens[-1]] for s in self.active], dtype=torch.long, device=device)
        # Each row sees its own keys only: positions 0..pos (the rest of the row is padding or stale). An additive
        # mask in the model's dtype, made once here rather than converted from bool in every layer.
        mask = None
        if min(lengths) < width - 1:
            hidden_keys = torch.arange(width, device=device) > pos[:, None]
            mask = torch.zeros(n, 1, 1, width, dtype=self.cache.kv.dtype, device=device)
            mask.masked_fill_(hidden_keys[:, None, None, :], float("-inf"))
        memory_kv, memory_mask = None, None
        if not c.decoder_only:
            src_lengths = self.cross.lengths[:n]
            s = max(src_lengths)
            memory_kv = [(layer[0, :n, :, :s], layer[1, :n, :, :s]) for layer in self.cross.kv]
            if min(src_lengths) < s:
                memory_mask = torch.arange(s, device=device) < torch.tensor(src_lengths, device=device)[:, None]
        same_pos = width - 1 if mask is None else None
        hidden = model.decode(tokens, kv_caches=self.cache.step_caches(pos, width, same_pos), positions=pos[:, None],
                              attn_mask=mask, memory_kv=memory_kv, memory_padding_mask=memory_mask)
        for i in range(n):
            self.cache.lengths[i] += 1
        active = list(self.active)
        results = [(s, t, lp) for s, (t, lp) in zip(active, self._sample(active, model.logits(hidden[:, -1]).float()))]
        for s in active:
            if s.done:
                self._retire(s)
        return results

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, float]]:
        tokens = logits.argmax(dim=-1)
        for i, s in enumerate(seqs):
            if not s.greedy:
                tokens[i] = sample_next(logits[i:i + 1], s.temperature, s.top_k, s.top_p, s.generator)[0]
        logprobs = F.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        out = list(zip(tokens.tolist(), logprobs.tolist()))
        for s, (token, _) in zip(seqs, out):
            s.tokens.append(token)
            eos = self.model.config.eos_token_id if s.eos_token_id is None else s.eos_token_id
            s.done = token == eos or len(s.tokens) >= s.max_new_tokens
        return out

    def _retire(self, seq: Sequence) -> None:
        if self.on_done is not None:
            self.on_done(seq)
        self.remove(seq)

    def remove(self, seq: Sequence) -> None:
        """Retire a sequence (finished or cancelled); the last active row moves into its row."""
        if seq.row < 0 or seq.row >= len(self.active) or self.active[seq.row] is not seq:
            return
        last = self.active.pop()
        if last is not seq:
            for cache in (self.cache, self.cross):
                if cache is not None:
                    cache.move(last.row, seq.row)
            last.row = seq.row
            self.active[seq.row] = last
        seq.row = -1
