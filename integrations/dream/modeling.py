"""Native transformers-5 implementation of Dream-v0 (Qwen2.5 layout, bidirectional attention).

Module paths equal those of the released checkpoint (and of ``Qwen2ForCausalLM``), so a released
``model.safetensors`` loads as is. The blocks are transformers' own ``Qwen2DecoderLayer`` with causal
masking switched off. Like the release, the model returns raw logits: the logit predicting token i sits
at position i - 1 (autoregressive heritage); the adapter realigns them.

Attention masks: ``None`` / ``"full"`` (full attention), a 4D bool mask [B, 1, L, L] (True = attend, the
release's format), or a 2D padding mask [B, L] (1 = keep), which is converted with
:func:`padding_attention_mask` and, when no position ids are given, :func:`padding_position_ids`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from bilevel_dlm.kv_cache import KVCache

from .configuration import DreamConfig

__all__ = [
    "DreamBaseModel",
    "DreamModel",
    "DreamPreTrainedModel",
    "padding_attention_mask",
    "padding_position_ids",
]

AttentionMask = torch.Tensor | str | None
# transformers renamed the decoder layers' cache argument (past_key_values -> cache, 5.2x); None: neither
# (a later rename), and a cache passed under the wrong name would vanish into **kwargs.
_CACHE_KEYWORD = next((name for name in ("cache", "past_key_values")
                       if name in inspect.signature(Qwen2DecoderLayer.forward).parameters), None)


def padding_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """2D padding mask [B, L] (1 = keep) -> 4D bool [B, 1, L, L], True where query i may attend key j.

    Real queries attend to real keys only (the release's key AND query padding); a padded query attends
    to itself only, so no softmax row is empty (no NaN) and padding never reaches real positions.
    """
    keep = mask.bool()
    pairs = keep[:, :, None] & keep[:, None, :]
    diagonal = torch.eye(keep.shape[1], dtype=torch.bool, device=keep.device)
    return (pairs | diagonal)[:, None]


def padding_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] counting real tokens only (left padding keeps real positions at 0, 1, ...)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class DreamPreTrainedModel(PreTrainedModel):
    """Shared settings: Qwen2 weight init, HF gradient checkpointing, eager or SDPA attention."""

    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_record_outputs = {"hidden_states": Qwen2DecoderLayer, "attentions": Qwen2Attention}


class DreamBaseModel(DreamPreTrainedModel):
    """Embeddings, bidirectional Qwen2 blocks and the final norm (the release's ``DreamBaseModel``)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        for layer in self.layers:
            layer.self_attn.is_causal = False
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: AttentionMask = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        """Final hidden states; with ``kv_cache`` (:class:`bilevel_dlm.kv_cache.KVCache`) of its window only."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DreamBaseModel.forward: pass exactly one of input_ids or inputs_embeds")
        batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        if kv_cache is not None and _CACHE_KEYWORD is None:
            raise RuntimeError("this transformers version's Qwen2DecoderLayer.forward takes neither `cache` nor "
                               "`past_key_values`, so Dream cannot pass it a KVCache; decode with cache='none'")
        columns = slice(None) if kv_cache is None else kv_cache.columns(length)
        inputs_embeds = self.embed_tokens(input_ids[:, columns]) if inputs_embeds is None else inputs_embeds[:, columns]
        bool_mask, position_ids = self._normalise_mask(attention_mask, position_ids, batch, length, inputs_embeds.device)
        if bool_mask is not None:
            bool_mask = bool_mask[:, :, columns]  # the window's queries against every key
        attention_bias = self._attention_bias(bool_mask, inputs_embeds.dtype)
        position_ids = position_ids[:, columns]

        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        cache = {} if kv_cache is None else {_CACHE_KEYWORD: kv_cache}
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=attention_bias,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                **cache,
                **kwargs,
            )
        return BaseModelOutput(last_hidden_state=self.norm(hidden))

    @staticmethod
    def _normalise_mask(
        attention_mask: AttentionMask,
        position_ids: torch.Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Any accepted mask -> (4D bool mask or None for full attention, position ids)."""
        bool_mask = None
        if isinstance(attention_mask, str):
            if attention_mask != "full":
                raise ValueError(f"attention_mask={attention_mask!r}: the only accepted string is 'full'")
        elif attention_mask is not None and attention_mask.dim() == 2:
            if not bool(attention_mask.bool().all()):
                bool_mask = padding_attention_mask(attention_mask)
                if position_ids is None:
                    position_ids = padding_position_ids(attention_mask)
        elif attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            bool_mask = attention_mask
        elif attention_mask is not None:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} and dtype {attention_mask.dtype} is not "
                "supported; pass None, 'full', a 2D padding mask [B, L] or a 4D bool mask [B, 1, L, L]"
            )
        if position_ids is None:
            position_ids = torch.arange(length, device=device).expand(batch, -1)
        return bool_mask, position_ids

    def _attention_bias(self, bool_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask in the form the attention implementation adds: bool for SDPA, 0 / min for eager."""
        if bool_mask is None or self.config._attn_implementation == "sdpa":
            return bool_mask
        return torch.zeros((), dtype=dtype, device=bool_mask.device).masked_fill(~bool_mask, torch.finfo(dtype).min)


class DreamModel(DreamPreTrainedModel):
    """Dream-v0 language model (the release's class name): ``model`` plus an untied ``lm_head``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: AttentionMask = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        """Raw logits [B, L, V]; the logit for token i is at position i - 1 (see module docstring). With
        ``kv_cache`` (keys and values kept between denoising steps) the logits cover its window only."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            kv_cache=kv_cache,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        return MaskedLMOutput(logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
