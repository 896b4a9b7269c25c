"""bilevel_dlm as an lm-evaluation-harness model (``lm_eval --model bilevel_dlm``), with parametric memory.

    python -m bilevel_dlm.lm_eval run --model bilevel_dlm --model_args pretrained=run/,memory=prompt \\
        --tasks bilevel_dlm_long_context --include_path "$(python -m bilevel_dlm.lm_eval --tasks-dir)"

(``run`` is lm-eval's own command line with this model registered: ``import bilevel_dlm.lm_eval``
registers it, which the plain ``lm_eval`` command does not do before it looks the model up.)

or from Python, with a wrapper already in hand::

    lm = BilevelDLM(wrapper=wrapper, memory="prompt")
    lm_eval.simple_evaluate(model=lm, tasks=["bilevel_dlm_mv_256"], task_manager=task_manager())

``memory=prompt`` adapts a fresh memory on each request's context alone (the paper's "Train &
Inference" setting), also inside a batch (per-sample memory); the scored continuation never enters it.

``loglikelihood`` is the masked-diffusion Monte Carlo estimate of the LLaDA release: for draw d of
``mc_num`` (stratified, from a generator seeded with ``seed`` for every request), k_d of the T
continuation tokens are masked, k_d = max(1, ceil(T (d + u_d) / mc_num)) with u_d ~ U(0, 1), chosen by a
random permutation; the estimate is ``-(1 / mc_num) sum_d (T / k_d) sum_{masked} CE``, the negative ELBO
weighted by 1 / (masked fraction). ``is_greedy``: the argmax of the fully masked continuation equals it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..evaluation import decode_answers, encode_prompts
from ..selection import Selection
from ..wrapper import MemoryWrapper

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - only without the optional extra
    raise ImportError("bilevel_dlm.lm_eval needs lm-evaluation-harness: pip install 'bilevel_dlm[eval]'") from error

__all__ = ["BilevelDLM", "TASKS_DIR", "task_manager"]

TASKS_DIR = Path(__file__).with_name("tasks")
SAMPLER_SETTINGS = ("steps", "block_length", "remasking", "temperature", "cfg_scale", "threshold", "factor", "alg",
                    "top_p", "top_k", "alg_temp", "cache", "cache_refresh")


def task_manager():
    """An lm-eval TaskManager that knows this package's offline long-context tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def _load(pretrained: str, device: str) -> MemoryWrapper:
    """A MemoryWrapper checkpoint, or a model folder of a built-in family (with its tokenizer)."""
    from ..checkpoint import META

    path = Path(pretrained)
    if (path / META).exists() or any(path.glob("checkpoint-*")):
        return MemoryWrapper.from_pretrained(path, device=device)
    from transformers import AutoTokenizer

    from ..integrations import load_pretrained

    return MemoryWrapper(load_pretrained(path).to(device), tokenizer=AutoTokenizer.from_pretrained(path))


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
class BilevelDLM(LM):
    """An lm-eval model over a :class:`MemoryWrapper` (see the module docstring).

    Args:
        pretrained: a bilevel_dlm checkpoint or a built-in family's model folder (or pass ``wrapper``).
        memory: ``off`` or ``prompt`` (adapt on each request's context).
        batch_size: requests per generation batch; Monte Carlo draws per forward for loglikelihood.
        mc_num: Monte Carlo draws per loglikelihood request.
        max_batch_size: accepted for lm-eval's command line (which always passes it); unused.
        tokenizer: a tokenizer folder to use instead of the checkpoint's (RULER's tasks read it too).
        max_length: the window of ``loglikelihood_rolling`` (default: the model's maximum length).
        max_gen_toks: default generation length when a task gives none.
        seed: of the sampler, the adaptation and the Monte Carlo masks.
        sampler settings (``steps``, ``block_length``, ``remasking``, ``temperature``, ``cfg_scale``,
        ``threshold``, ...): for the backbone's default sampler.
    """

    def __init__(self, pretrained: str | None = None, *, wrapper: MemoryWrapper | None = None, memory: str = "off",
                 batch_size: int | str = 1, device: str = "cpu", mc_num: int = 32, max_gen_toks: int = 64,
                 seed: int = 1234, max_batch_size: int | None = None, tokenizer: str | None = None,
                 max_length: int | None = None, **sampler_settings: Any) -> None:
        super().__init__()
        if (pretrained is None) == (wrapper is None):
            raise ValueError("BilevelDLM needs exactly one of pretrained=<path> or wrapper=<MemoryWrapper>")
        if memory not in ("off", "prompt"):
            raise ValueError(f"memory must be 'off' or 'prompt', got {memory!r}")
        unknown = sorted(set(sampler_settings) - set(SAMPLER_SETTINGS))
        if unknown:
            raise ValueError(f"unknown model_args {unknown}; sampler settings are {list(SAMPLER_SETTINGS)}")
        self.wrapper = wrapper or _load(pretrained, device)
        if tokenizer is not None:
            from transformers import AutoTokenizer

            self.wrapper.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if self.wrapper.tokenizer is None:
            raise ValueError("BilevelDLM needs a tokenizer: save the checkpoint with one, or give the wrapper one")
        self.tokenizer = self.wrapper.tokenizer
        self.memory, self.mc_num, self.max_gen_toks, self.seed = memory, int(mc_num), int(max_gen_toks), int(seed)
        self.batch_size = 1 if str(batch_size) == "auto" else int(batch_size)
        self.sampler_settings = {key: _value(value) for key, value in sampler_settings.items()}
        self.last_memory = None  # the memory the last loglikelihood request was scored with (inspection)
        self.max_length = max_length or self.wrapper.max_length or 2048

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "BilevelDLM":
        pairs = dict(item.split("=", 1) for item in arg_string.split(",") if item)
        return cls.create_from_arg_obj({k: _value(v) for k, v in pairs.items()}, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "BilevelDLM":
        """``--model_args`` win over lm-eval's own ``--batch_size`` / ``--device`` defaults."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**{k: _value(v) for k, v in arg_dict.items()}, **extra)

    # ----- lm-eval's interface ---------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template; run lm-eval without --apply_chat_template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, generated with the backbone's sampler and cut at its stop strings."""
        outputs: list[str] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in tqdm(range(0, len(requests), self.batch_size), disable=disable_tqdm, desc="generate_until"):
            chunk = [request.args for request in requests[start:start + self.batch_size]]
            settings = chunk[0][1] if len(chunk[0]) > 1 else {}
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            length = int(settings.get("max_gen_toks", self.max_gen_toks))
            ids, mask = encode_prompts(self.tokenizer, [context for context, *_ in chunk], pad)
            generated = self.wrapper.generate(ids, mask, max_new_tokens=length, adapt=self.memory == "prompt",
                                              seed=self.seed, **self.sampler_settings)
            for text in decode_answers(self.tokenizer, generated[:, ids.shape[1]:].cpu()):
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                outputs.append(text)
        return outputs

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self.score(context, continuation)
                for context, continuation in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood")]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string: windows of the model's maximum length, each scored after
        the ones before it (the last window's context is the preceding text, up to the limit)."""
        results = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            window = max(2, self.max_length - 1)
            total = 0.0
            for start in range(0, len(tokens), window):
                context = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
                total += self.score_ids(context, tokens[start:start + window])[0]
            results.append(total)
        return results

    # ----- scoring ------------------------------------------------------------------------------------------
    def score(self, context: str, continuation: str) -> tuple[float, bool]:
        context_ids = self.tokenizer(context)["input_ids"]
        return self.score_ids(context_ids, self.tokenizer(continuation, add_special_tokens=False)["input_ids"])

    def adapted_memory(self, context_ids: list[int]):
        """The memory adapted on the context alone (``memory=prompt``), or None."""
        if self.memory == "off":
            return None
        return self.wrapper.adapt(torch.tensor([context_ids], device=self.wrapper.device), seed=self.seed)

    def draws(self, length: int) -> torch.Tensor:
        """The Monte Carlo masks [mc_num, length] (bool) of a continuation of ``length`` tokens."""
        generator = torch.Generator().manual_seed(self.seed)
        masks = torch.zeros(self.mc_num, length, dtype=torch.bool)
        for d in range(self.mc_num):
            u = float(torch.rand((), generator=generator))
            k = max(1, math.ceil(length * (d + u) / self.mc_num))
            masks[d, torch.randperm(length, generator=generator)[:k]] = True
        return masks

    @torch.no_grad()
    def score_ids(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
        """(Monte Carlo log-likelihood of the continuation given the context, is_greedy)."""
        if not continuation_ids:
            return 0.0, True
        wrapper, mask_id = self.wrapper, self.wrapper.mask_token_id
        memory = self.last_memory = self.adapted_memory(context_ids)
        sequence = torch.tensor(context_ids + continuation_ids, device=wrapper.device)
        start, length = len(context_ids), len(continuation_ids)
        masks = torch.zeros(self.mc_num, sequence.shape[0], dtype=torch.bool, device=wrapper.device)
        masks[:, start:] = self.draws(length).to(wrapper.device)
        was_training = wrapper.model.training
        wrapper.model.eval()
        try:
            with memory.bind() if memory is not None else nullcontext():
                total = 0.0
                for first in range(0, self.mc_num, max(1, self.batch_size)):
                    chunk = masks[first:first + max(1, self.batch_size)]
                    inputs = torch.where(chunk, mask_id, sequence)
                    select = Selection.of(chunk)
                    ratio = chunk[:, start:].float().mean(1)
                    logits, _ = wrapper.view.logits_at(select, inputs, None, ratio)
                    ce = F.cross_entropy(logits.float(), select.take(sequence.expand_as(inputs)), reduction="none")
                    weights = (length / chunk.sum(1).float())[select.rows]
                    total += float((ce * weights).sum())
                full = sequence.clone()
                full[start:] = mask_id
                greedy = wrapper.view.logits(full[None], None, torch.ones(1, device=wrapper.device))[0, start:].argmax(-1)
        finally:
            wrapper.model.train(was_training)
        return -total / self.mc_num, bool(torch.equal(greedy, sequence[start:]))
