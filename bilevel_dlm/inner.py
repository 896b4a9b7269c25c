"""InnerLoop: adapt the fast weights on a simulated denoising trajectory.

For each stage: forward with the memory bound, inner loss on the stage's supervised positions,
gradient with respect to the fast weights only, optimizer update. ``first_order`` (MemDLM) treats the
adapted fast weights as constants for the outer loss and freezes the base weights while adapting, so
autograd records nothing below the first fast weight. ``unrolled`` keeps the graph through all K
updates, so the outer gradient includes d phi_K / d theta and meta-parameters (MetaSGD rates) learn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch
import torchopt
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchopt.base import GradientTransformation

from .config import AdaptConfig, InnerConfig
from .forward import ModelView
from .contracts import InnerMethod, InnerResult
from .losses import token_loss, weighted_mean
from .memory import MemoryParams
from .meta_init import MetaInit
from .noise import Anchor
from .optim import MetaSGD, build_inner_optimizer, per_tensor_clip
from .prefix import PrefixReplay, frozen
from .rng import RandomSource
from .selection import Selection
from .trajectory import Stage, TrajectorySimulator, make_simulator, masked_fraction

Gradients = tuple[torch.Tensor | None, ...]

__all__ = ["InnerLoop", "InnerResult"]


@contextmanager
def checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Temporarily disable transformers-style activation checkpointing (``gradient_checkpointing`` flags).

    Unrolled mode needs it: the outer backward runs through the inner stages' graphs after the fast
    weights have moved on, so a recomputed stage would see the wrong memory.
    """
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


class _TorchoptStepper:
    """Functional update with a torchopt GradientTransformation."""

    def __init__(self, transformation: GradientTransformation) -> None:
        self.transformation = transformation

    def init(self, values: tuple[torch.Tensor, ...]) -> None:
        self.state = self.transformation.init(values)

    def step(self, loss: torch.Tensor, values: tuple[torch.Tensor, ...], create_graph: bool,
             complete: Callable[[Gradients], tuple[torch.Tensor, ...]]):
        grads = complete(torch.autograd.grad(loss, values, create_graph=create_graph, allow_unused=True))
        updates, self.state = self.transformation.update(grads, self.state, params=values, inplace=False)
        return torchopt.apply_updates(values, updates, inplace=False), grads


class _HigherStepper:
    """The same update through ``higher``'s differentiable optimizers (optional backend)."""

    def __init__(self, config: InnerConfig) -> None:
        try:
            import higher  # noqa: F401
        except ImportError as error:  # pragma: no cover - exercised only without the extra
            raise ImportError("backend='higher' needs the optional dependency: pip install 'bilevel_dlm[higher]'") from error
        self.config = config
        self.clip = per_tensor_clip(config.clip) if config.clip is not None else None

    def init(self, values: tuple[torch.Tensor, ...]) -> None:
        import higher.optim

        optimizer_class = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[self.config.optimizer]
        reference = [torch.zeros_like(v, requires_grad=True) for v in values]
        self.diffopt = higher.optim.get_diff_optim(optimizer_class(reference, lr=self.config.lr), reference)

    def step(self, loss: torch.Tensor, values: tuple[torch.Tensor, ...], create_graph: bool,
             complete: Callable[[Gradients], tuple[torch.Tensor, ...]]):
        self.diffopt._track_higher_grads = create_graph
        seen: list[torch.Tensor] = []

        def clip(grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
            grads = list(complete(tuple(grads)))
            if self.clip is not None:
                grads = list(self.clip.update(tuple(grads), None)[0])
            seen.extend(grads)
            return grads

        new_values = self.diffopt.step(loss, params=list(values), grad_callback=clip)
        return tuple(new_values), tuple(seen)


class InnerLoop(InnerMethod):
    """Runs the K inner stages on a batch and leaves the adapted fast weights in ``memory``.

    Args:
        view: the model seen through its backbone adapter.
        memory: the fast weights to adapt (reset at the start of every :meth:`run`).
        simulator: builds the stages from the anchor (default: ``AnchorConsistent()``).
        optimizer: a torchopt GradientTransformation or a :class:`MetaSGD` (default: from config).
        config: steps, mode, loss, weighting, backend, meta_init.
        initial: a meta-learned initialisation to start from (default: built from ``config.meta_init``).
            It is trained by ``config.meta_init``'s rule, which must be its own; with meta_init ``none``
            it is a fixed start (what ``for_prompts`` passes to adapt from the trained phi_0).
        seed: seeds the first draw of a meta-learned initialisation built from the config.
    """

    shares_anchor_prefix = True  # the anchor stage sees exactly the outer input x_t
    name = "MemDLM"

    def __init__(
        self,
        view: ModelView,
        memory: MemoryParams,
        simulator: TrajectorySimulator | None = None,
        optimizer: GradientTransformation | MetaSGD | None = None,
        config: InnerConfig | None = None,
        initial: MetaInit | None = None,
        seed: int = 0,
    ) -> None:
        self.view = view
        self.memory = memory
        self.config = config or InnerConfig()
        self.simulator = simulator or make_simulator("anchor_consistent")
        self.optimizer = optimizer if optimizer is not None else build_inner_optimizer(self.config, memory.names)
        if self.config.backend == "higher" and optimizer is not None:
            raise ValueError("backend='higher' builds its optimizer from the config; do not pass optimizer=")
        if initial is None and self.config.meta_init != "none":
            initial = MetaInit(memory, self.config.meta_init, self.config.reptile_rate, seed)
        elif initial is not None and self.config.meta_init not in ("none", initial.method):
            raise ValueError(f"initial= trains phi_0 by {initial.method!r} but config.meta_init is "
                             f"{self.config.meta_init!r}: make them agree, or set meta_init='none' to start from "
                             "phi_0 without training it (as adapt does)")
        self.initial = initial
        #: phi_0 is trained here (config.meta_init names its rule), or only started from (meta_init 'none').
        self.trains_initial = initial is not None and self.config.meta_init != "none"
        self.base_params = [p for p in view.model.parameters() if p.requires_grad]

    @property
    def unrolled(self) -> bool:
        return self.config.mode == "unrolled"

    @property
    def adapts(self) -> bool:
        return self.config.steps > 0

    def for_prompts(self, memory: MemoryParams, settings: AdaptConfig) -> "InnerLoop":
        """First order, ``settings.steps`` stages, the same trajectory, optimizer (rebuilt at ``settings.lr``
        when set) and meta-learned initialisation."""
        # The initialisation is shared (passed below), not trained here: meta_init "none" in the copy.
        config = self.config.model_copy(update={"steps": settings.steps, "mode": "first_order", "meta_init": "none"})
        optimizer = None if config.backend == "higher" else self.optimizer
        if settings.lr is not None:  # the adaptation's own rate: the configured optimizer at that lr
            config = config.model_copy(update={"lr": settings.lr})
            optimizer = None if config.backend == "higher" else build_inner_optimizer(config, memory.names)
        return InnerLoop(self.view, memory, self.simulator, optimizer, config, initial=self.initial)

    def meta_parameters(self) -> list[nn.Parameter]:
        """Parameters of the inner loop itself: MetaSGD rates, and phi_0 of a meta-learned initialisation
        (Reptile's phi_0 does not require grad: it is updated after the step, not by the optimizer)."""
        rates = list(self.optimizer.parameters()) if isinstance(self.optimizer, nn.Module) else []
        return rates + (list(self.initial.values) if self.trains_initial else [])

    def after_backward(self) -> None:
        if self.trains_initial:
            self.initial.after_backward(self.memory)

    def after_step(self, stepped: bool) -> None:
        if self.trains_initial:
            self.initial.after_step(stepped)

    def _stepper(self):
        if self.config.backend == "higher":
            return _HigherStepper(self.config)
        transformation = self.optimizer.transformation() if isinstance(self.optimizer, MetaSGD) else self.optimizer
        return _TorchoptStepper(transformation)

    def run(
        self,
        x0: torch.Tensor,
        maskable: torch.Tensor,
        anchor: Anchor,
        attention_mask: torch.Tensor | None = None,
        *,
        generator: RandomSource = None,
        weighting: str | None = None,
        prefix: PrefixReplay | None = None,
    ) -> InnerResult:
        """Reset the memory, simulate the trajectory and adapt; returns per-stage metrics.

        With ``steps == 0`` nothing runs and the memory stays empty (the plain MDLM baseline). With
        ``prefix``, the anchor stage records the blocks below the first fast weight for the outer pass.
        """
        if self.config.steps == 0:
            self.memory.clear()
            empty = torch.zeros(0, device=x0.device)
            return InnerResult(empty, empty)
        initial = None if self.initial is None else self.initial.initial(differentiable=self.trains_initial and self.unrolled)
        self.memory.reset(batch_size=x0.shape[0], generator=generator, initial=initial)
        stages = self.simulator(x0, maskable, anchor, self.config.steps, self.view.mask_token_id, generator)
        teachers = self.simulator.teacher_inputs(stages, x0) if self.config.loss != "ce" else [None] * len(stages)
        weighting = weighting or self.config.weighting
        stepper = self._stepper()
        values = tuple(v.requires_grad_() for v in self.memory.values)
        stepper.init(values)
        losses, norms = [], []
        unrolled = (sdpa_kernel(SDPBackend.MATH), checkpointing_off(self.view.model)) if self.unrolled else ()
        with ExitStack() as stack, self.memory.bind():
            for context in unrolled:
                stack.enter_context(context)
            for stage, teacher_input in zip(stages, teachers):
                select = Selection.of(stage.supervised)
                # The teacher runs outside any prefix context: its input is not the recorded one.
                teacher = None if teacher_input is None else self._teacher(select, teacher_input, maskable, attention_mask)
                with self._stage_context(stage, prefix):  # the backward runs inside too (checkpoint recomputation)
                    self.memory.used_values.clear()
                    loss = self._stage_loss(stage, select, x0, attention_mask, weighting, teacher)
                    values, grads = stepper.step(loss, values, self.unrolled, self._complete_gradients(loss, values))
                if not self.unrolled:
                    values = tuple(v.detach().requires_grad_() for v in values)
                self.memory.set(values)
                losses.append(loss.detach())
                norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if not self.unrolled:  # first order: phi_K is a constant (a leaf when FOMAML needs its outer gradient)
            leaf = self.config.meta_init == "fomaml"
            self.memory.set(tuple(v.detach().requires_grad_(leaf) for v in values))
        return InnerResult(torch.stack(losses), torch.stack(norms).detach())

    def _stage_context(self, stage: Stage, prefix: PrefixReplay | None) -> AbstractContextManager:
        """Replay or record the shared prefix on the anchor stage; otherwise freeze theta (first order)."""
        if prefix is not None and stage.is_anchor:
            if prefix.recorded:
                return prefix.replay()
            # Records theta's graph of the prefix for the outer pass; first order keeps no other graph.
            return prefix.record(self.base_params, graph_above=self.unrolled)
        return nullcontext() if self.unrolled else frozen(self.base_params)

    def _complete_gradients(self, loss: torch.Tensor, values: tuple[torch.Tensor, ...]):
        """Check the gradients of a stage: a fast weight whose module ran in the forward must get one.

        Only a module that never ran (an MoE expert that received no token) may have none; it gets zero.
        Anything else means the graph was cut between the memory and the loss, which would silently turn
        the inner loop into a no-op, so it raises.
        """
        used = set(self.memory.used_values)

        def cut(index: int) -> RuntimeError:
            return RuntimeError(
                f"the fast weight {self.memory.names[index]!r} was used in the forward but received no "
                "gradient: something cut the autograd graph between the memory and the inner loss. The usual "
                "cause is reentrant activation checkpointing (use_reentrant=True runs the forward under "
                "no_grad); enable it with model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False})."
            )

        if not loss.requires_grad:
            raise cut(min(used)) if used else RuntimeError(
                "no fast weight took part in the inner loss: the memory's target modules never ran")

        def complete(grads: Gradients) -> tuple[torch.Tensor, ...]:
            for index, grad in enumerate(grads):
                if grad is None and index in used:
                    raise cut(index)
            return tuple(torch.zeros_like(v) if g is None else g for g, v in zip(grads, values))

        return complete

    @torch.no_grad()
    def _teacher(self, select: Selection, teacher_input: torch.Tensor, maskable: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits and hidden states at the selected positions: the same model and current memory,
        no gradient, on the simulator's teacher input (the next, less masked state)."""
        ratio = masked_fraction(maskable & (teacher_input == self.view.mask_token_id), maskable)
        return self.view.logits_at(select, teacher_input, attention_mask, ratio)

    def _stage_loss(
        self,
        stage: Stage,
        select: Selection,
        x0: torch.Tensor,
        attention_mask: torch.Tensor | None,
        weighting: str,
        teacher: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        logits, hidden = self.view.logits_at(select, stage.input_ids, attention_mask, stage.t)
        teacher_logits, teacher_hidden = teacher if teacher is not None else (None, None)
        per_token = token_loss(self.config.loss, logits, select.take(x0), hidden, teacher_logits, teacher_hidden)
        t = stage.t.clamp_min(1e-3)
        weights = (1.0 / t if weighting == "inverse_t" else torch.ones_like(t))[select.rows]
        return weighted_mean(per_token, weights, select.rows, x0.shape[0], self.memory.per_sample)
