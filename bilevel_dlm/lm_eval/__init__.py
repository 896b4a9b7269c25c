"""bilevel_dlm as an lm-evaluation-harness model (``lm_eval --model bilevel_dlm``), with parametric memory.

    python -m bilevel_dlm.lm_eval run --model bilevel_dlm --model_args pretrained=run/,memory=prompt \\
        --tasks bilevel_dlm_long_context --include_path "$(python -m bilevel_dlm.lm_eval --tasks-dir)"

(``run`` is lm-eval's own command line with this model registered: ``import bilevel_dlm.lm_eval``
registers it, which the plain ``lm_eval`` command does not do before it looks the model up.)

or from Python, with a wrapper already in hand::

    lm = BilevelDLM(wrapper=wrapper, memory="prompt")
    lm_eval.simple_evaluate(model=lm, tasks=["bilevel_dlm_mv_256"], task_manager=task_manager())

Scores follow the references' own rules, so they can stand next to published LLaDA / Dream numbers:

- ``loglikelihood``: lm-eval's pair encoding and empty-context rule, then the masked-diffusion Monte Carlo
  estimate of LLaDA's evaluation (``mc_num=128`` draws, classifier-free guidance with ``cfg_scale``,
  ``is_greedy`` by one-token-per-step decoding), or dllm's Dream rule for Dream (``protocols``).
- ``loglikelihood_rolling``: lm-eval's rolling windows, each scored after the text before it.
- ``generate_until``: requests batched only with requests of the same generation settings; the task's
  ``max_gen_toks`` rounded up to whole blocks, cut at it, at EOS / end-of-turn tokens and at stop strings.
- Inputs longer than ``max_length`` are left-truncated (counted and logged), the same in both memory modes.

``memory=prompt`` adapts a fresh memory on each request's context alone (the paper's "Train &
Inference" setting; once per distinct context), also inside a batch (per-sample memory); the scored
continuation never enters it.
"""

from __future__ import annotations

from pathlib import Path

try:
    import lm_eval  # noqa: F401
except ImportError as error:  # pragma: no cover - only without the optional extra
    raise ImportError("bilevel_dlm.lm_eval needs lm-evaluation-harness: pip install 'bilevel_dlm[eval]'") from error

from .model import BilevelDLM

__all__ = ["BilevelDLM", "TASKS_DIR", "task_manager"]

TASKS_DIR = Path(__file__).with_name("tasks")


def task_manager():
    """An lm-eval TaskManager that knows this package's offline long-context tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))
