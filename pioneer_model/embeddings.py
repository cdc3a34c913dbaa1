"""Load pre-trained word vectors (word2vec/GloVe text, .npy, .safetensors) onto a tokenizer's vocabulary."""

from pathlib import Path

import numpy as np
import torch


class EmbeddingLoadError(ValueError):
    """PRE_TRAINED_EMBEDDINGS could not be used; the message names the file and the problem."""


def _text_vectors(path: Path, dim: int) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                parts = line.rstrip().split(" ")
                if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue  # word2vec header: "<count> <dim>"
                if len(parts) < 2:
                    continue
                if len(parts) - 1 != dim:
                    raise EmbeddingLoadError(
                        f"{path}:{line_no}: vectors have {len(parts) - 1} dimensions, EMBEDDING_DIM is {dim}"
                    )
                try:
                    vectors[parts[0]] = np.asarray(parts[1:], dtype=np.float32)
                except ValueError:
                    raise EmbeddingLoadError(f"{path}:{line_no}: not a word followed by numbers") from None
    except (OSError, UnicodeError) as exc:
        raise EmbeddingLoadError(f"cannot read {path}: {exc}") from None
    return vectors


def _matrix(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
    except Exception as exc:
        raise EmbeddingLoadError(f"cannot read {path}: {exc}") from None
    for name in ("embeddings", "weight", "embedding.weight", "wte.weight"):
        if name in tensors:
            return tensors[name]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise EmbeddingLoadError(f"{path} holds {sorted(tensors)}; expected one matrix or one named 'embeddings'")


def load_pretrained_vectors(path, vocab: dict[str, int], dim: int, vocab_size: int):
    """Returns (matrix (vocab_size, dim), set of row ids that received a pre-trained vector).

    A matrix file (.npy, .safetensors) is taken row-for-row as the tokenizer's ids. A text file maps words onto
    tokens: a byte-level BPE token's leading-space marker "Ġ" is dropped and the word looked up as is, then
    lower-cased.
    """
    path = Path(path)
    if not path.exists():
        raise EmbeddingLoadError(f"PRE_TRAINED_EMBEDDINGS file not found: {path}")
    if path.suffix in (".npy", ".safetensors"):
        matrix = np.asarray(_matrix(path), dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != dim:
            raise EmbeddingLoadError(f"{path}: matrix shape {matrix.shape}, expected (rows, {dim})")
        rows = min(matrix.shape[0], vocab_size)
        full = np.zeros((vocab_size, dim), dtype=np.float32)
        full[:rows] = matrix[:rows]
        return torch.from_numpy(full), set(range(rows))

    vectors = _text_vectors(path, dim)
    if not vectors:
        raise EmbeddingLoadError(f"{path} holds no vectors")
    full, found = np.zeros((vocab_size, dim), dtype=np.float32), set()
    for token, idx in vocab.items():
        if idx >= vocab_size:
            continue
        word = token.lstrip("Ġ▁")
        vector = vectors.get(word)
        if vector is None:
            vector = vectors.get(word.lower())
        if vector is not None:
            full[idx] = vector
            found.add(idx)
    return torch.from_numpy(full), found
