"""Attention heatmaps: one panel per head of one layer, tokens on both axes."""

import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own decoded text, with whitespace made visible."""
    labels = []
    for i in ids:
        piece = tokenizer.decode([i], skip_special_tokens=False)
        labels.append(repr(piece)[1:-1].replace(" ", "␣") or str(i))
    return labels


def plot_attention(model, tokenizer, text: str, out_path, layer: int = -1, max_tokens: int = 64) -> Path:
    """Save a grid of heatmaps of `layer`'s self-attention weights over `text` (the encoder's for
    encoder-decoder models) and return the image's path. Rows are queries, columns keys."""
    ids = tokenizer.encode(text)[-max_tokens:]
    if not ids:
        raise ValueError("no tokens to plot: the text is empty")
    was_training = model.training
    model.eval()
    try:
        maps = model.attention_maps(torch.tensor([ids], device=model.device))
    finally:
        model.train(was_training)
    weights = maps[layer][0].float().cpu()  # (heads, seq, seq)
    labels = token_labels(tokenizer, ids)

    heads = weights.size(0)
    cols = math.ceil(math.sqrt(heads))
    rows = math.ceil(heads / cols)
    side = max(3.0, 0.18 * len(ids) + 1.5)
    fig = Figure(figsize=(cols * side, rows * side))  # Agg canvas, no pyplot: safe in servers and threads
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    layer_no = layer % len(maps)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(weights[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer_no} head {h}", fontsize=9)
        ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(ids)), labels, fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    return out_path
