"""A Flax (linen) BART for conditional generation.

The parameter tree is the transformers-4.x Flax layout, so a hub `flax_model.msgpack` loads unchanged (with
`tie_word_embeddings=False` it also holds `lm_head/kernel (D, V)` and `embed_tokens/embedding (V, D)` in the encoder
and the decoder, see `lora_jax.models.tying`):

    {final_logits_bias: (1, V),
     model: {shared: {embedding: (V, D)},
             encoder: {embed_positions: {embedding: (P + 2, D)}, layernorm_embedding: {scale, bias},
                       layers: {'0': {self_attn: {q_proj|k_proj|v_proj|out_proj: {kernel (D, D), bias}},
                                      self_attn_layer_norm, fc1, fc2, final_layer_norm}, ...}},
             decoder: {..., layers: {'0': {self_attn, self_attn_layer_norm, encoder_attn,
                                           encoder_attn_layer_norm, fc1, fc2, final_layer_norm}, ...}}}}

Every projection is an `nn.Dense` (`lora_jax.quantization.Dense`: the same layer, also accepting a kernel stored
quantised or in another dtype than it computes in), which is what lets LoRA attach to any of them by interception.
Decoding with a key/value cache is functional: the cache is a pytree passed in and returned, so it can be the
carry of a `lax.while_loop` (see `lora_jax.generation`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lora_jax.models.attention import BartAttention, causal_bias, check_attention, padding_bias
from lora_jax.models.config import BartConfig
from lora_jax.dropout import Dropout
from lora_jax.quantization import Dense, Embed
from lora_jax.models.layer_stack import REMAT_POLICIES, LayerStack, remat_policy  # noqa: F401 (re-exported)

Array = jax.Array
# BART's learned positions are offset by 2 (a fairseq legacy): position p reads row p + 2.
POSITION_OFFSET = 2

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation_function {name!r} is not supported; use one of {sorted(ACTIVATIONS)}") from None


def _layer_norm(dtype, param_dtype, name):
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


def _setup_self_attention_and_feed_forward(layer: nn.Module, heads: int, ffn_dim: int) -> None:
    """Called from a layer's `setup`: what encoder and decoder layers share, as direct children of the layer (the
    Hugging Face parameter layout): self_attn and its LayerNorm, the feed-forward block fc1 (d_model, ffn_dim),
    fc2 (ffn_dim, d_model), final_layer_norm, and the dropouts."""
    c, dt, pdt = layer.config, layer.dtype, layer.param_dtype
    init = nn.initializers.normal(c.init_std)
    layer.self_attn = BartAttention(c, heads, dt, pdt, layer.attention)
    layer.self_attn_layer_norm = _layer_norm(dt, pdt, "self_attn_layer_norm")
    layer.fc1 = Dense(ffn_dim, dtype=dt, param_dtype=pdt, kernel_init=init)
    layer.fc2 = Dense(c.d_model, dtype=dt, param_dtype=pdt, kernel_init=init)
    layer.final_layer_norm = _layer_norm(dt, pdt, "final_layer_norm")
    layer.dropout = Dropout(c.dropout)
    layer.act_dropout = Dropout(c.activation_dropout)


def _feed_forward(layer: nn.Module, hidden: Array, deterministic: bool) -> Array:
    """The feed-forward block with its residual connection and post-LayerNorm, (B, T, d_model) -> same."""
    residual = hidden
    hidden = layer.act_dropout(activation(layer.config.activation_function)(layer.fc1(hidden)), deterministic=deterministic)
    hidden = layer.dropout(layer.fc2(hidden), deterministic=deterministic)
    return layer.final_layer_norm(residual + hidden)


class BartEncoderLayer(nn.Module):
    config: BartConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str | None = None

    def setup(self):
        _setup_self_attention_and_feed_forward(self, self.config.encoder_attention_heads, self.config.encoder_ffn_dim)

    def __call__(self, hidden: Array, bias: Array, deterministic: bool = True) -> Array:
        residual = hidden
        hidden, _ = self.self_attn(hidden, bias, deterministic=deterministic)
        hidden = self.self_attn_layer_norm(residual + self.dropout(hidden, deterministic=deterministic))
        return _feed_forward(self, hidden, deterministic)


class BartDecoderLayer(nn.Module):
    config: BartConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str | None = None

    def setup(self):
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        _setup_self_attention_and_feed_forward(self, c.decoder_attention_heads, c.decoder_ffn_dim)
        self.encoder_attn = BartAttention(c, c.decoder_attention_heads, dt, pdt, self.attention)
        self.encoder_attn_layer_norm = _layer_norm(dt, pdt, "encoder_attn_layer_norm")

    def cross_kv(self, encoder_hidden: Array) -> tuple[Array, Array]:
        return self.encoder_attn.project_kv(encoder_hidden)

    def __call__(
        self,
        hidden: Array,
        self_bias: Array,
        encoder_hidden: Array | None,
        cross_bias: Array,
        cache: dict | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, dict | None]:
        """`cache` = {'self': self-attention cache, 'cross': (k, v)} during incremental decoding, else None."""
        residual = hidden
        hidden, self_cache = self.self_attn(
            hidden, self_bias, self_cache=None if cache is None else cache["self"], deterministic=deterministic
        )
        hidden = self.self_attn_layer_norm(residual + self.dropout(hidden, deterministic=deterministic))
        residual = hidden
        hidden, _ = self.encoder_attn(
            hidden,
            cross_bias,
            kv_states=encoder_hidden,
            cached_kv=None if cache is None else cache["cross"],
            deterministic=deterministic,
        )
        hidden = self.encoder_attn_layer_norm(residual + self.dropout(hidden, deterministic=deterministic))
        hidden = _feed_forward(self, hidden, deterministic)
        new_cache = None if cache is None else {"self": self_cache, "cross": cache["cross"]}
        return hidden, new_cache


class _Stack(nn.Module):
    """What the encoder and the decoder share: the token embedding (`shared` when tied, else its own `embed_tokens`,
    see `lora_jax.models.tying`), learned positions (max_position_embeddings + 2 rows), layernorm_embedding,
    dropout, and the layers of `layer_spec()`."""

    config: BartConfig
    shared: nn.Embed
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str | None = None
    scan_layers: bool = False
    attention: str | None = None

    def layer_spec(self) -> tuple[type, int]:
        """(layer class, number of layers)."""
        raise NotImplementedError

    def token_embeddings(self, ids: Array) -> Array:
        """(B, T) ids -> (B, T, D) token embeddings, scaled: from this stack's own `embed_tokens` when the config is
        untied or the params hold one (e.g. a PEFT modules_to_save copy), else from the shared embedding."""
        params = self.variables.get("params", {})
        if self.config.tie_word_embeddings and "embed_tokens" not in params:
            return self.shared(ids) * self.config.embed_scale
        if "embed_tokens" in params and "embedding" not in params["embed_tokens"]:
            where = "/".join(self.path + ("embed_tokens",))
            raise ValueError(
                f"params hold {sorted(params['embed_tokens'])} at {where} but no embedding there (the base is tied): "
                "untie the base first, params = lora_jax.untie_embeddings(params)"
            )
        return self.own_embed_tokens(ids) * self.config.embed_scale

    def setup(self):
        c = self.config
        self.embed_positions = nn.Embed(
            c.max_position_embeddings + POSITION_OFFSET,
            c.d_model,
            embedding_init=nn.initializers.normal(c.init_std),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.layernorm_embedding = _layer_norm(self.dtype, self.param_dtype, None)
        self.own_embed_tokens = _embedding(c, self.dtype, self.param_dtype, "embed_tokens")
        self.dropout = Dropout(c.dropout)
        layer_cls, num_layers = self.layer_spec()
        self.layers = LayerStack(c, layer_cls, num_layers, self.dtype, self.param_dtype, self.remat, self.scan_layers,
                                 self.attention)


class BartEncoder(_Stack):
    def layer_spec(self) -> tuple[type, int]:
        return BartEncoderLayer, self.config.encoder_layers

    def __call__(self, input_ids: Array, attention_mask: Array, deterministic: bool = True) -> Array:
        """input_ids, attention_mask (B, S) -> last hidden state (B, S, D)."""
        c = self.config
        seq_len = input_ids.shape[1]
        if seq_len > c.max_position_embeddings:
            raise ValueError(f"source length {seq_len} exceeds max_position_embeddings={c.max_position_embeddings}")
        hidden = self.token_embeddings(input_ids)
        hidden = hidden + self.embed_positions(jnp.arange(seq_len) + POSITION_OFFSET)[None]
        hidden = self.dropout(self.layernorm_embedding(hidden), deterministic=deterministic)
        bias = padding_bias(attention_mask)
        return self.layers(hidden, (bias,), deterministic)


class BartDecoder(_Stack):
    def layer_spec(self) -> tuple[type, int]:
        return BartDecoderLayer, self.config.decoder_layers

    def cross_kv(self, encoder_hidden: Array) -> list[tuple[Array, Array]]:
        return [layer.cross_kv(encoder_hidden) for layer in self.layers.layers]

    def __call__(
        self,
        decoder_input_ids: Array,
        encoder_hidden: Array | None,
        encoder_attention_mask: Array,
        decoder_attention_mask: Array | None = None,
        cache: list | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, list | None]:
        """decoder_input_ids (B, T) -> hidden (B, T, D).

        Without a cache, attention is causal over the T tokens. With one (incremental decoding), the T tokens sit at
        positions cache_index ... cache_index + T - 1 and attend to every earlier cached position.
        """
        c = self.config
        batch, seq_len = decoder_input_ids.shape
        start = 0 if cache is None else cache[0]["self"]["index"]
        positions = start + jnp.arange(seq_len) + POSITION_OFFSET
        hidden = self.token_embeddings(decoder_input_ids) + self.embed_positions(positions)[None]
        hidden = self.dropout(self.layernorm_embedding(hidden), deterministic=deterministic)
        k_len = seq_len if cache is None else cache[0]["self"]["k"].shape[2]
        self_bias = causal_bias(seq_len, k_len, start)
        if decoder_attention_mask is not None:
            self_bias = self_bias + padding_bias(decoder_attention_mask)
        cross_bias = padding_bias(encoder_attention_mask)
        if cache is None:
            return self.layers(hidden, (self_bias, encoder_hidden, cross_bias, None), deterministic), None
        new_cache = []
        for layer, layer_cache in zip(self.layers.layers, cache):  # decoding: unrolled, the cache stays per layer
            hidden, layer_cache = layer(hidden, self_bias, encoder_hidden, cross_bias, layer_cache, deterministic)
            new_cache.append(layer_cache)
        return hidden, new_cache


def _embedding(c: BartConfig, dtype, param_dtype, name: str) -> nn.Embed:
    """A (vocab_size, d_model) token embedding with BART's normal(init_std) init."""
    init = nn.initializers.normal(c.init_std)
    return Embed(c.vocab_size, c.d_model, embedding_init=init, dtype=dtype, param_dtype=param_dtype, name=name)


class BartModule(nn.Module):
    """The `model` subtree: shared embedding, encoder, decoder."""

    config: BartConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str | None = None
    scan_layers: bool = False
    attention: str | None = None

    def setup(self):
        c = self.config
        self.shared = _embedding(c, self.dtype, self.param_dtype, "shared")
        stack = dict(remat=self.remat, scan_layers=self.scan_layers, attention=self.attention)
        self.encoder = BartEncoder(c, self.shared, self.dtype, self.param_dtype, **stack)
        self.decoder = BartDecoder(c, self.shared, self.dtype, self.param_dtype, **stack)


class BartForConditionalGeneration(nn.Module):
    """BART with its LM head (tied to the shared embedding, or `lm_head` when untied) and `final_logits_bias`.

    Methods (call through `model.apply(variables, ..., method=...)`):
      __call__(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> logits (B, T, V)
      encode(input_ids, attention_mask) -> (B, S, D)
      decode(decoder_input_ids, encoder_hidden, encoder_attention_mask, ...) -> (logits (B, T, V), cache)
      init_cache(encoder_hidden, max_length) -> cache for `decode`

    remat: None, or a REMAT_POLICIES name ('full', 'dots', 'dots_no_batch'): every encoder/decoder layer is
    rematerialised with that policy in training, trading recomputation for activation memory (e.g.
    `model.clone(remat="dots")`). Parameters and outputs are unchanged.
    scan_layers: run each layer stack as one `lax.scan` in cache-free calls (training, evaluation, encoding), so
    XLA compiles one layer body instead of one per layer (lora_jax/models/layer_stack.py); same parameter tree.
    attention: None / "xla" / "cudnn" (`jax.nn.dot_product_attention`'s implementation) or "explicit"
    (lora_jax/models/attention.py says which calls use which path).
    generation_config: the default generation settings (a `lora_jax.GenerationConfig`; `load_pretrained` sets the
    checkpoint's); None: the config's generation fields. Hashable, so the model stays a static jit argument.
    """

    config: BartConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str | None = None
    scan_layers: bool = False
    attention: str | None = None
    generation_config: Any = None

    def setup(self):
        remat_policy(self.remat)  # a clear error for an unknown name
        check_attention(self.attention)
        self.model = BartModule(self.config, self.dtype, self.param_dtype, self.remat, self.scan_layers, self.attention)
        self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros, (1, self.config.vocab_size), self.param_dtype)
        init = nn.initializers.normal(self.config.init_std)
        self.lm_head = nn.Dense(
            self.config.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init
        )

    def encode(self, input_ids: Array, attention_mask: Array, deterministic: bool = True) -> Array:
        if self.is_initializing() and not self.config.tie_word_embeddings:
            # Untied, the forward never reads model/shared, but it is a weight of the checkpoint (transformers saves
            # and loads it): create it, so that init gives the checkpoint's tree.
            self.model.shared(input_ids)
        return self.model.encoder(input_ids, attention_mask, deterministic=deterministic)

    def lm_logits(self, hidden: Array) -> Array:
        """(B, T, D) -> float32 logits (B, T, V): through `lm_head` (D, V) when the config is untied or the params hold
        one (e.g. a PEFT modules_to_save copy), else through the tied shared embedding."""
        if self.config.tie_word_embeddings and "lm_head" not in self.variables.get("params", {}):
            logits = self.model.shared.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32) + self.final_logits_bias.astype(jnp.float32)

    def decode(
        self,
        decoder_input_ids: Array,
        encoder_hidden: Array | None,
        encoder_attention_mask: Array,
        decoder_attention_mask: Array | None = None,
        cache: list | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, list | None]:
        hidden, cache = self.model.decoder(
            decoder_input_ids, encoder_hidden, encoder_attention_mask, decoder_attention_mask, cache, deterministic
        )
        return self.lm_logits(hidden), cache

    def init_cache(self, encoder_hidden: Array, max_length: int, num_beams: int = 1) -> list:
        """A decoding cache for up to `max_length` decoder tokens: per layer, zeroed self-attention keys/values
        (B * num_beams, H, L, Dh) and the cross-attention keys/values of `encoder_hidden` (B, S, D), computed once
        and shared by the num_beams consecutive hypotheses of each input (decode then takes the (B, S) mask)."""
        c = self.config
        batch = encoder_hidden.shape[0] * num_beams
        heads = c.decoder_attention_heads
        shape = (batch, heads, max_length, c.d_model // heads)
        zeros = jnp.zeros(shape, self.dtype)
        return [
            {"self": {"k": zeros, "v": zeros, "index": jnp.array(0, jnp.int32)}, "cross": kv}
            for kv in self.model.decoder.cross_kv(encoder_hidden)
        ]

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        decoder_input_ids: Array,
        decoder_attention_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        encoder_hidden = self.encode(input_ids, attention_mask, deterministic)
        logits, _ = self.decode(
            decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask, deterministic=deterministic
        )
        return logits


# The label of a position the loss ignores (padding), PyTorch's CrossEntropyLoss ignore_index, as transformers uses it.
IGNORE = -100


def shift_tokens_right(labels: Array, pad_token_id: int, decoder_start_token_id: int) -> Array:
    """labels (B, T) with IGNORE for ignored positions -> decoder_input_ids (B, T)."""
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted == IGNORE, pad_token_id, shifted)


def init_params(model: BartForConditionalGeneration, rng: Array, seq_len: int = 8) -> dict:
    """Random parameters (BART's normal(init_std) init; LayerNorms at 1/0) for `model`."""
    ids = jnp.ones((1, seq_len), jnp.int32)
    return model.init(rng, ids, jnp.ones_like(ids), ids)["params"]
