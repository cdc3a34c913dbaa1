"""Greedy decoding on a GPU with no host work per token: each step is replayed from one CUDA graph (gpt-fast's way)."""

import warnings
from contextlib import contextmanager

import torch

stats = {"captured": 0, "capture_failed": 0}  # CUDA graphs of greedy_tokens, for benchmarks and diagnosis
CHECK_EVERY = 32  # tokens between the host's checks whether every row has finished (each check waits for the GPU)
EAGER_STEPS = 2  # steps run before capturing: they compile the step and set up the libraries' workspaces


def avoid_cudnn_attention(device) -> None:
    """Turn off cuDNN's attention on CUDA. It builds an execution plan for each new key length, and decoding with a
    growing cache has a new one every step. Batched eager decoding on an H200 took ~40 ms a step at every batch
    size from 16 to 1024 (2026-11-28), which that would explain; benchmarks/gpu.py times a step with and without
    it. Flash and memory-efficient attention take over."""
    if torch.device(device).type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)


@torch.inference_mode()
def greedy_tokens(step, logits: torch.Tensor, max_new_tokens: int, eos: int | None, graphed: bool = True):
    """The (batch, n) greedy tokens after the first logits, as _generate's loop makes them (rows that finished
    repeat eos, and decoding stops once every row has). `step` is start_decoding(compile=True)'s: fixed shapes,
    all its state on the device, so one step can be captured and replayed. graphed=False runs it as it is."""
    batch, device = logits.size(0), logits.device
    token = logits.float().argmax(-1, keepdim=True)
    finished = token == eos if eos is not None else torch.zeros_like(token, dtype=torch.bool)
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    out[:, :1] = token
    column = torch.ones(1, dtype=torch.long, device=device)  # where the next token goes

    def advance():
        nxt = step(token).float().argmax(-1, keepdim=True)
        if eos is not None:
            nxt = nxt.masked_fill(finished, eos)
            finished.logical_or_(nxt == eos)
        token.copy_(nxt)
        out.index_copy_(1, column, nxt)
        column.add_(1)

    made = 1

    def more() -> bool:
        return made < max_new_tokens and not (eos is not None and made % CHECK_EVERY == 1 and bool(finished.all()))

    if graphed and max_new_tokens > 2 + EAGER_STEPS:
        with side_stream(device) as side:  # where CUDA wants warm-up and capture to run
            while made < 1 + EAGER_STEPS and more():  # these compile the step and set up cuBLAS
                advance()
                made += 1
            if more():
                try:
                    advance = capture(advance, side)
                    stats["captured"] += 1
                except RuntimeError as exc:  # not capturable here: decode on without a graph (a capture runs nothing)
                    stats["capture_failed"] += 1
                    warnings.warn(f"CUDA graph capture failed, decoding without one: {exc}", RuntimeWarning)
    while more():
        advance()
        made += 1
    out = out[:, :made]
    if eos is not None:  # stop where every row had finished, as a check after every token would have
        done = (out == eos).all(0).nonzero()
        if len(done):
            out = out[:, :int(done[0]) + 1]
    return out


@contextmanager
def side_stream(device):
    """A fresh CUDA stream that starts after, and is waited for by, the current one."""
    main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(main)
    try:
        with torch.cuda.stream(side):
            yield side
    finally:
        main.wait_stream(side)


def capture(fn, stream):
    """fn recorded (not run) as a CUDA graph on stream; returns the function that replays it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay
