"""The lm-eval model ``bilevel_dlm``: a :class:`MemoryWrapper` scored as LLaDA's and dllm's evaluations score
masked diffusion models, with optional per-request parametric memory (see the package docstring)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..checkpoint import load_tokenizer
from ..contracts import FastWeights
from ..evaluation import left_pad
from ..sampling import SAMPLERS, default_sampler
from ..wrapper import MemoryWrapper
from .generation import answer_tokens, decoding_run, stop_token_ids
from .protocols import PROTOCOLS, DreamProtocol, LikelihoodProtocol, LLaDAProtocol, fit_to_length
from .scoring import greedy_reproduces, monte_carlo_loglikelihood

__all__ = ["BilevelDLM"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 4096  # LLaDA's evaluation (dllm: 4096 for LLaDA and Dream), for a model that states none


def _load(pretrained: str, device: str, **loading: bool) -> MemoryWrapper:
    """A MemoryWrapper checkpoint (``loading``: the opt-ins of ``from_pretrained``), or a model folder of a
    built-in family (with its tokenizer)."""
    from ..checkpoint import META

    path = Path(pretrained)
    if (path / META).exists() or any(path.glob("checkpoint-*")):
        return MemoryWrapper.from_pretrained(path, device=device, **loading)
    from ..integrations import load_pretrained

    return MemoryWrapper(load_pretrained(path).to(device),
                         tokenizer=load_tokenizer(path, trust_remote_code=loading["trust_remote_code"]))


def _value(text: Any) -> Any:
    """A --model_args value: numbers as numbers, the rest as given."""
    if not isinstance(text, str):
        return text
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


@register_model("bilevel_dlm")
class BilevelDLM(TemplateLM):
    """An lm-eval model over a :class:`MemoryWrapper`.

    Args:
        pretrained: a bilevel_dlm checkpoint or a built-in family's model folder (or pass ``wrapper``).
        memory: ``off`` or ``prompt`` (a memory adapted on each distinct context alone).
        batch_size: requests per generation batch, and Monte Carlo draws per forward (LLaDA's meaning).
        mc_num: Monte Carlo draws per log-likelihood request (LLaDA and dllm: 128), in groups of batch_size
            (the last group smaller where batch_size does not divide it; LLaDA's evaluation refuses that).
        protocol: ``llada`` or ``dream`` (default: the backbone's ``likelihood_protocol``): whose tokenization
            and Monte Carlo masks score log-likelihoods (:mod:`bilevel_dlm.lm_eval.protocols`).
        is_check_greedy: compute ``is_greedy`` by LLaDA's one-token-per-step decoding (default: the
            protocol's reference: True for ``llada``, False for ``dream``, which then reports False).
        sampling_eps, add_bos_token: the ``dream`` protocol's settings (dllm: 1e-3, False).
        max_length: the longest sequence scored or generated (default: the model's maximum); longer inputs
            are left-truncated, counted and logged.
        max_gen_toks: generation length for tasks that give none (lm-eval's default, 256).
        gen_length: generate this many tokens for every request, whatever the task asks, and do not cut at
            the task's ``max_gen_toks`` (LLaDA's evaluation); default: the task's ``max_gen_toks``.
        seed: of the sampler, the adaptation and the Monte Carlo masks (the same for every request).
        tokenizer: a tokenizer folder to use instead of the checkpoint's (RULER's tasks read it too).
        max_batch_size: accepted for lm-eval's command line (which always passes it); unused.
        allow_pickle, trust_remote_code: the opt-ins of ``MemoryWrapper.from_pretrained`` for a checkpoint of an
            earlier release / one naming a model class the library does not know (off: no code it carries runs).
        sampler settings (``steps``, ``block_length``, ``remasking``, ``temperature``, ``cfg_scale``, ...): the
            backbone's default sampler; ``cfg_scale`` also guides log-likelihoods (LLaDA's ``cfg``).
    """

    def __init__(self, pretrained: str | None = None, *, wrapper: MemoryWrapper | None = None, memory: str = "off",
                 batch_size: int | str = 1, device: str = "cpu", mc_num: int = 128, protocol: str | None = None,
                 is_check_greedy: bool | None = None, sampling_eps: float | None = None,
                 add_bos_token: bool | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 gen_length: int | None = None, seed: int = 1234, tokenizer: str | None = None,
                 max_batch_size: int | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
                 **sampler_settings: Any) -> None:
        super().__init__()
        if (pretrained is None) == (wrapper is None):
            raise ValueError("BilevelDLM needs exactly one of pretrained=<path> or wrapper=<MemoryWrapper>")
        if memory not in ("off", "prompt"):
            raise ValueError(f"memory must be 'off' or 'prompt', got {memory!r}")
        for name, flag in (("allow_pickle", allow_pickle), ("trust_remote_code", trust_remote_code)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        self.wrapper = wrapper or _load(pretrained, device, allow_pickle=allow_pickle,
                                        trust_remote_code=trust_remote_code)
        fields = sorted(SAMPLERS[self.wrapper.backbone.default_sampler].model_fields)
        unknown = sorted(set(sampler_settings) - set(fields))
        if unknown:
            raise ValueError(f"unknown model_args {unknown}; the settings of this model's sampler are {fields}")
        if tokenizer is not None:
            self.wrapper.tokenizer = load_tokenizer(Path(tokenizer), trust_remote_code=trust_remote_code)
        if self.wrapper.tokenizer is None:
            raise ValueError("BilevelDLM needs a tokenizer: save the checkpoint with one, or give the wrapper one")
        self.tokenizer = self.wrapper.tokenizer
        self.memory, self.seed = memory, int(seed)
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)  # "auto", "auto:N"
        self.mc_num, self.max_gen_toks = int(mc_num), int(max_gen_toks)
        self.gen_length = None if gen_length is None else int(gen_length)
        if self.mc_num < 1 or self.batch_size < 1:
            raise ValueError(f"mc_num and batch_size must be positive, got {self.mc_num} and {self.batch_size}")
        self.sampler_settings = sampler_settings
        self.sampler = default_sampler(self.wrapper.backbone, **self.sampler_settings)  # validated now, not mid-run
        self.cfg_scale = float(getattr(self.sampler, "cfg_scale", 0.0))  # LLaDA's cfg guides likelihoods too
        self.protocol = self._protocol(protocol or self.wrapper.backbone.likelihood_protocol, sampling_eps,
                                       add_bos_token)
        self.is_check_greedy = self.protocol.checks_greedy if is_check_greedy is None else bool(is_check_greedy)
        self.max_length = self._max_length(max_length)
        self.stops = stop_token_ids(self.tokenizer, self.wrapper.model)
        self.adaptations = 0  # memories adapted for log-likelihoods so far (one per distinct context and call)
        self.last_memory: FastWeights | None = None  # the memory the last log-likelihood was scored with

    @staticmethod
    def _protocol(name: str, sampling_eps: float | None, add_bos_token: bool | None) -> LikelihoodProtocol:
        if name not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
        dream_settings = {key: value for key, value in (("sampling_eps", sampling_eps),
                                                        ("add_bos_token", add_bos_token)) if value is not None}
        if name != "dream" and dream_settings:
            raise ValueError(f"{sorted(dream_settings)} are settings of the dream protocol, not of {name!r}; "
                             "add protocol=dream or leave them out")
        return DreamProtocol(**dream_settings) if name == "dream" else PROTOCOLS[name]()

    def _max_length(self, requested: int | None) -> int:
        model_max = self.wrapper.max_length
        if requested is not None and model_max is not None and int(requested) > model_max:
            raise ValueError(f"max_length={requested} exceeds the model's maximum length {model_max}")
        return int(requested or model_max or DEFAULT_MAX_LENGTH)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "BilevelDLM":
        pairs = dict(item.split("=", 1) for item in arg_string.split(",") if item)
        return cls.create_from_arg_obj(pairs, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "BilevelDLM":
        """``--model_args`` win over lm-eval's own ``--batch_size`` / ``--device`` defaults."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**{k: _value(v) for k, v in arg_dict.items()}, **extra)

    # ----- tokenization (TemplateLM) -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty context: BOS, or EOS for a tokenizer without one (lm-eval's HF model)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's ids, its special tokens added by default (as LLaDA's and dllm's evaluations and
        lm-eval's HF model call it), except for a string that already starts with BOS (a chat template's
        output), which lm-eval's HF model encodes without adding another."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos is not None and has_bos_prefix(string, bos))
        return self.tokenizer(string, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.protocol.encode_pair(self, context, continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``TemplateLM.loglikelihood`` with the protocol's encoding, empty contexts included."""
        return self._loglikelihood_tokens([(request.args, *self.protocol.encode(self, *request.args))
                                           for request in requests], disable_tqdm=disable_tqdm)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template; run lm-eval without --apply_chat_template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ----- memory and mode ----------------------------------------------------------------------------------
    def adapted_memory(self, context_ids: list[int]) -> FastWeights | None:
        """The memory adapted on the context alone (``memory=prompt``; None for ``off`` or no context)."""
        if self.memory == "off" or not context_ids:
            return None
        self.adaptations += 1
        return self.wrapper.adapt(torch.tensor([context_ids], dtype=torch.long, device=self.wrapper.device),
                                  seed=self.seed)

    @contextmanager
    def scoring(self, memory: FastWeights | None) -> Iterator[None]:
        """The model in eval mode with ``memory`` bound."""
        was_training = self.wrapper.model.training
        self.wrapper.model.eval()
        try:
            with memory.bind() if memory is not None else nullcontext():
                yield
        finally:
            self.wrapper.model.train(was_training)

    # ----- log-likelihood -------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, protocol: LikelihoodProtocol | None = None,
                              ) -> list[tuple[float, bool]]:
        """Each (context ids, continuation ids) request scored; one adaptation per distinct context."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        truncated = 0
        for index, (_, context, continuation) in enumerate(requests):
            context, continuation, cut = fit_to_length(context, continuation, self.max_length)
            truncated += cut
            by_context.setdefault(tuple(context), []).append((index, continuation))
        for context, members in tqdm(by_context.items(), disable=disable_tqdm, desc="loglikelihood contexts"):
            memory = self.last_memory = self.adapted_memory(list(context))
            for index, continuation in members:
                results[index] = self.score_tokens(list(context), continuation, memory, protocol or self.protocol)
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], results[index])
        if truncated:
            logger.warning("%d of %d log-likelihood requests were longer than max_length=%d and were left-truncated",
                           truncated, len(requests), self.max_length)
        return results

    def score_tokens(self, context: list[int], continuation: list[int], memory: FastWeights | None,
                     protocol: LikelihoodProtocol) -> tuple[float, bool]:
        """(Monte Carlo log-likelihood of the continuation given the context, is_greedy), with ``memory``."""
        if not continuation:
            return 0.0, True
        view = self.wrapper.view
        sequence = torch.tensor(context + continuation, dtype=torch.long, device=self.wrapper.device)
        generator = torch.Generator().manual_seed(self.seed)
        draws = [protocol.draw(len(context), len(continuation), rows, generator)
                 for rows in protocol.group_sizes(self.mc_num, self.batch_size)]
        cfg_scale = self.cfg_scale if protocol.guides else 0.0
        with self.scoring(memory):
            value = monte_carlo_loglikelihood(view, sequence, len(context), draws, cfg_scale)
            greedy = self.is_check_greedy and greedy_reproduces(view, sequence, len(context), cfg_scale)
        return value, greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string over lm-eval's rolling windows (the string encoded as lm-eval's
        HF model encodes it, ``get_rolling_token_windows`` + ``make_disjoint_window``, context length 1): each
        window's tokens scored after up to ``max_length - len(window)`` preceding tokens (the first after the
        prefix token), by LLaDA's estimator for every protocol (the last position of a window is a real
        token, which dllm's Dream rule never masks)."""
        results = []
        for (text,) in tqdm([request.args for request in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1)]
            scores = self._loglikelihood_tokens([(None, context, target) for context, target in windows],
                                                disable_tqdm=True, protocol=LLaDAProtocol())
            results.append(sum(value for value, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
        return results

    # ----- generation -----------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, generated in batches of requests with the same generation settings
        (lm-eval's ``Collator``; one request at a time for a sampler that draws random numbers), cut at
        ``max_gen_toks``, the first stop token, and the stop strings."""
        collator = Collator([request.args for request in requests], group_by="gen_kwargs", group_fn=lambda args: args[1],
                            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]))
        outputs: list[str] = []
        truncated = 0
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        # A sampling sampler's draws depend on the rows beside a row: one request at a time, so that a request's
        # output never depends on batch_size or on the other requests.
        batch_size = 1 if self.sampler.draws_random_numbers else self.batch_size
        for chunk in collator.get_batched(n=batch_size):
            contexts, settings = zip(*chunk)
            texts, cut = self.generate_batch(list(contexts), settings[0])
            outputs += texts
            truncated += cut
            for context, setting, text in zip(contexts, settings, texts):
                self.cache_hook.add_partial("generate_until", (context, setting), text)
            progress.update(len(texts))
        progress.close()
        if truncated:
            logger.warning("%d of %d generation contexts were left-truncated to fit max_length=%d with the "
                           "generated tokens", truncated, len(requests), self.max_length)
        return collator.get_original(outputs)

    def generate_batch(self, contexts: list[str], settings: dict[str, Any]) -> tuple[list[str], int]:
        """The answers to ``contexts`` under one request's generation ``settings``, and how many contexts
        were left-truncated to fit."""
        settings = normalize_gen_kwargs(settings, self.max_gen_toks)
        until = handle_stop_sequences(settings.get("until"), eos=None)
        length, sampler = decoding_run(self.sampler, self.gen_length or settings["max_gen_toks"])
        room = self.max_length - length - sampler.canvas_margin
        if room < 1:
            raise ValueError(f"generating {length} tokens leaves no room for a context within max_length="
                             f"{self.max_length}; lower the task's max_gen_toks (or gen_length / block_length)")
        rows = [self.tok_encode(context) or [self.prefix_token_id] for context in contexts]
        truncated = sum(len(row) > room for row in rows)
        pad = self.wrapper.pad_token_id()
        input_ids, attention_mask = left_pad([row[-room:] for row in rows], pad)
        generated = self.wrapper.generate(input_ids, attention_mask, max_new_tokens=length, sampler=sampler,
                                          adapt=self.memory == "prompt", seed=self.seed)
        limit = None if self.gen_length else settings["max_gen_toks"]
        answers = [postprocess_generated_text(self.tok_decode(answer_tokens(row, limit, self.stops)), until, None)
                   for row in generated[:, input_ids.shape[1]:].tolist()]
        return answers, truncated
