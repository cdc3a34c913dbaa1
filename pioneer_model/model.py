"""The complete AttentionModel: a decoder-only language model, or an encoder-decoder, with one config."""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .attention import KVCache, linear
from .layers import PositionalEncoding, TokenEmbedding, TransformerDecoder, TransformerEncoder

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    attention_heads: int = 8
    embedding_dim: int = 512
    sequence_length: int = 1024
    dropout_rate: float = 0.1
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    learning_rate: float = 1e-4
    positional_encoding_type: str = "fixed"
    ffn_dim: int | None = None  # default 4 * embedding_dim
    activation: str = "gelu"
    norm_eps: float = 1e-5
    bias: bool = True
    scale_embeddings: bool = True
    pre_trained_embeddings: str | None = None
    freeze_embeddings: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    name: str = "pioneer"
    # Earlier chat messages the model reads before the current one (None: as many as fit). Small models trained
    # on short exchanges answer far worse with history in front of the question.
    max_history_messages: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "attention_heads", "embedding_dim", "sequence_length", "num_decoder_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.upper()} must be at least 1, got {getattr(self, name)}")
        if self.num_encoder_layers < 0:
            raise ValueError(f"NUM_ENCODER_LAYERS must be 0 or more, got {self.num_encoder_layers}")
        if self.embedding_dim % self.attention_heads:
            raise ValueError(
                f"EMBEDDING_DIM {self.embedding_dim} must be divisible by ATTENTION_HEADS {self.attention_heads}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"DROPOUT_RATE must be in [0, 1), got {self.dropout_rate}")
        if self.positional_encoding_type not in ("fixed", "learnable"):
            raise ValueError(
                f"POSITIONAL_ENCODING_TYPE must be 'fixed' or 'learnable', got {self.positional_encoding_type!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def decoder_only(self) -> bool:
        return self.num_encoder_layers == 0

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.attention_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# The spec's defaults are `base` (for GPUs). `small` trains on a 2-core CPU in minutes; `tiny` is for tests.
PRESETS: dict[str, dict] = {
    "base": {},
    "small": dict(
        attention_heads=4, embedding_dim=256, sequence_length=256, dropout_rate=0.1,
        num_encoder_layers=0, num_decoder_layers=4, learning_rate=1e-3, ffn_dim=1024,
        # Measured on the default model: 42 of 47 held-out small-talk replies were adequate with no history,
        # 18 with two earlier messages, 9 with twelve.
        max_history_messages=0,
    ),
    "tiny": dict(
        attention_heads=2, embedding_dim=64, sequence_length=128, dropout_rate=0.0,
        num_encoder_layers=0, num_decoder_layers=2, learning_rate=3e-3, ffn_dim=128,
    ),
}


class AttentionModel(nn.Module):
    """Token embedding + positions -> [encoder] -> decoder -> logits tied to the embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        ffn_dim = c.ffn_dim or 4 * c.embedding_dim
        stack = dict(dim=c.embedding_dim, heads=c.attention_heads, ffn_dim=ffn_dim, dropout=c.dropout_rate,
                     activation=c.activation, eps=c.norm_eps, bias=c.bias)
        self.tok_emb = TokenEmbedding(c.vocab_size, c.embedding_dim, scale=c.scale_embeddings)
        self.pos = PositionalEncoding(c.positional_encoding_type, c.sequence_length, c.embedding_dim)
        self.emb_dropout = nn.Dropout(c.dropout_rate)
        self.encoder = TransformerEncoder(c.num_encoder_layers, **stack) if c.num_encoder_layers else None
        self.decoder = TransformerDecoder(c.num_decoder_layers, **stack, cross=not c.decoder_only)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("out_proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * (c.num_decoder_layers + c.num_encoder_layers)))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, ids, positions=None, start=0):
        x = self.pos(self.tok_emb(ids), positions, start)
        return self.emb_dropout(x) if self.training else x

    def encode(self, src_ids, src_padding_mask=None, need_weights=False):
        """Encoder output for a source sequence; src_padding_mask True = real token."""
        memory, maps = self.encoder(self.embed(src_ids), src_padding_mask, need_weights)
        return (memory, maps) if need_weights else memory

    def decode(self, ids, *, memory=None, memory_kv=None, memory_padding_mask=None, kv_caches=None,
               positions=None, attn_mask=None, need_weights=False):
        """Decoder hidden states (after the final norm). With kv_caches, `ids` continue the cached prefix."""
        start = kv_caches[0].length if kv_caches and positions is None else 0
        x = self.embed(ids, positions, start)
        h, maps = self.decoder(x, memory=memory, memory_kv=memory_kv, memory_padding_mask=memory_padding_mask,
                               attn_mask=attn_mask, kv_caches=kv_caches, need_weights=need_weights)
        return (h, maps) if need_weights else h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.tok_emb.weight)

    def forward(self, input_ids, decoder_input_ids=None, src_padding_mask=None):
        """Decoder-only: logits (batch, seq, vocab) of input_ids. Encoder-decoder: logits of decoder_input_ids."""
        if self.config.decoder_only:
            return self.logits(self.decode(input_ids))
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids")
        memory = self.encode(input_ids, src_padding_mask)
        return self.logits(self.decode(decoder_input_ids, memory=memory, memory_padding_mask=src_padding_mask))

    def attention_maps(self, input_ids) -> list[torch.Tensor]:
        """Per-layer self-attention weights (batch, heads, seq, seq) of the first stack that reads input_ids."""
        with torch.no_grad():
            if self.config.decoder_only:
                return self.decode(input_ids, need_weights=True)[1]
            return self.encode(input_ids, need_weights=True)[1]

    def new_kv_caches(self, batch_size: int, max_len: int, dtype=None) -> list[KVCache]:
        c = self.config
        dtype = dtype or self.tok_emb.weight.dtype
        return [KVCache(batch_size, c.attention_heads, max_len, c.head_dim, dtype, self.device)
                for _ in range(c.num_decoder_layers)]

    def cross_kv(self, memory):
        """Per-layer cross-attention keys/values of an encoder output, computed once per generation."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder.layers]

    def generate(self, input_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, generator=None, compile=False):
        """Like Hugging Face's generate: (batch, prompt + new) ids for decoder-only models, (batch, 1 + new)
        decoder ids (starting with BOS) for encoder-decoder models. Greedy at temperature 0.
        compile=True decodes with a torch.compile'd step: it compiles once per batch size and length bucket
        (and source length, for encoder-decoder models), a minute on a small CPU, for a few percent there. On a
        GPU, greedy decoding then replays each step from a CUDA graph (pioneer_model.graphs)."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                        attention_mask, generator, compile)

    def stream_generate(self, input_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
                        eos_token_id=None, generator=None, compile=False):
        """Yield (token_id, log-probability) for each new token of one sequence."""
        from .generate import stream_generate

        return stream_generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                               generator, compile)

    def save_pretrained(self, directory, tokenizer=None):
        from .checkpoint import save_pretrained

        save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> "AttentionModel":
        from .checkpoint import load_pretrained

        return load_pretrained(directory, device, dtype)[0]
