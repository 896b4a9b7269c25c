"""The lm-eval model scores as its references do: lm-eval's own pair encoding and rolling windows (called
from lm-eval), LLaDA's Monte Carlo estimator with classifier-free guidance and its greedy check (written
here from ``eval_llada.py``), dllm's Dream estimator (written here from ``dllm/pipelines/dream/eval.py``),
on fixed masks and in float64, and the draws of both rules over many random cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'bilevel_dlm[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper  # noqa: E402
from bilevel_dlm.integrations import tiny_model  # noqa: E402
from bilevel_dlm.lm_eval import BilevelDLM  # noqa: E402
from bilevel_dlm.lm_eval.protocols import DreamProtocol, LLaDAProtocol, fit_to_length  # noqa: E402
from bilevel_dlm.lm_eval.scoring import greedy_reproduces, monte_carlo_loglikelihood  # noqa: E402
from bilevel_dlm.tasks import build_byte_level_tokenizer, build_tokenizer  # noqa: E402

CONTEXT, CONTINUATION = "The capital of France is Paris. The capital of Italy is Rome. Answer: ", "Paris"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (a space is part of the next word's token, 'ĠParis'); EOS, padding, mask, no BOS."""
    return build_byte_level_tokenizer([f"The capital of {country} is {city}. Answer: {city}" for country, city in
                                       [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"),
                                        ("Japan", "Tokyo")]] * 20, vocab_size=400)


def recipe() -> MemDLMConfig:
    return MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25))


@pytest.fixture(scope="module")
def bpe_wrapper() -> MemoryWrapper:
    """A float64 tiny LLaDA over the byte-level tokenizer, its head scaled so that argmaxes are decisive."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    model = tiny_model("llada", tokenizer, max_length=512).double()
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(20)
    return MemoryWrapper(model, recipe(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def dream_wrapper() -> MemoryWrapper:
    tokenizer = build_tokenizer()
    torch.manual_seed(1)
    return MemoryWrapper(tiny_model("dream", tokenizer).double(), recipe(), tokenizer=tokenizer)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


class Recording(BilevelDLM):
    """The model, recording every (context, continuation) it scores."""

    def score_tokens(self, context, continuation, memory, protocol):
        self.scored.append((list(context), list(continuation)))
        return super().score_tokens(context, continuation, memory, protocol)


def recording(wrapper: MemoryWrapper, **settings) -> Recording:
    lm = Recording(wrapper=wrapper, **settings)
    lm.scored = []
    return lm


# ----- tokenization and windows: lm-eval's own functions ------------------------------------------------------
def test_a_pair_is_split_as_lm_eval_splits_it_with_the_space_joined_to_the_word(bpe_wrapper) -> None:
    lm = recording(bpe_wrapper, mc_num=2, batch_size=2)
    lm.loglikelihood([request("loglikelihood", CONTEXT, CONTINUATION)])
    (context, continuation), = lm.scored
    assert (context, continuation) == tuple(TemplateLM._encode_pair(lm, CONTEXT, CONTINUATION))
    assert lm.tokenizer.convert_ids_to_tokens(continuation) == ["ĠParis"]
    assert context + continuation == lm.tokenizer(CONTEXT + CONTINUATION)["input_ids"]


def test_an_empty_context_follows_lm_eval_with_memory_on_and_no_bos(bpe_wrapper) -> None:
    assert bpe_wrapper.tokenizer.bos_token_id is None
    lm = recording(bpe_wrapper, memory="prompt", mc_num=2, batch_size=2)
    (value, _), = lm.loglikelihood([request("loglikelihood", "", "Paris is the capital")])
    eos = bpe_wrapper.tokenizer.eos_token_id
    assert lm.scored == [([eos], lm.tokenizer("Paris is the capital", add_special_tokens=False)["input_ids"])]
    assert value < 0 and lm.adaptations == 1


def test_rolling_windows_are_lm_eval_s_and_each_is_scored_after_the_text_before_it(bpe_wrapper) -> None:
    lm = recording(bpe_wrapper, mc_num=4, batch_size=4, max_length=24)
    text = " ".join(["The capital of France is Paris."] * 6)
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    tokens = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, lm.prefix_token_id, 23, 1)]
    assert lm.scored == [(list(c), list(t)) for c, t in expected] and len(expected) > 2
    assert lm.scored[0][0] == [lm.prefix_token_id]
    assert all(len(c) + len(t) == 24 for c, t in lm.scored[1:])  # max_length - len(window) tokens before it
    alone = sum(lm.score_tokens(c, t, None, lm.protocol)[0] for c, t in expected)
    assert total == pytest.approx(alone, abs=1e-9)


def test_a_short_last_window_is_scored_after_the_text_before_it(bpe_wrapper) -> None:
    tail = " The capital of Spain is Madrid."
    windows, scores = [], []
    for head in [f"The capital of {country} is {city}. Answer: {city}. " * 2
                 for country, city in [("France", "Paris"), ("Italy", "Rome")]]:
        lm = recording(bpe_wrapper, mc_num=4, batch_size=4, max_length=24)
        total = lm.loglikelihood_rolling([request("loglikelihood_rolling", head + tail)])[0]
        windows.append(lm.scored[-1])
        scores.append(total - lm.score_tokens(*lm.scored[0], None, lm.protocol)[0])  # the later windows' part
    assert len(windows) == 2 and windows[0][1] == windows[1][1] and windows[0][0] != windows[1][0]
    assert len(windows[0][0]) > 1 and scores[0] != pytest.approx(scores[1], abs=1e-6)


@given(st.integers(0, 40), st.integers(1, 40), st.integers(1, 50))
@settings(max_examples=200, deadline=None)
def test_left_truncation_keeps_the_last_tokens_and_the_continuation_first(n_context, n_target, limit) -> None:
    context, target = list(range(n_context)), list(range(100, 100 + n_target))
    cut_context, cut_target, truncated = fit_to_length(context, target, limit)
    whole = context + target
    assert cut_context + cut_target == whole[-min(limit, len(whole)):]
    assert truncated == (len(whole) > limit)
    assert cut_target == (target if n_target <= limit else target[-limit:])


# ----- Monte Carlo draws ---------------------------------------------------------------------------------------
@given(st.integers(0, 6), st.integers(1, 30), st.integers(1, 16), st.integers(0, 2**31))
@settings(max_examples=300, deadline=None)
def test_llada_draws_mask_a_stratified_count_of_continuation_tokens(n_context, n_target, rows, seed) -> None:
    masks, ratio = LLaDAProtocol().draw(n_context, n_target, rows, torch.Generator().manual_seed(seed))
    counts = masks.sum(1)
    assert masks.shape == (rows, n_context + n_target) and not masks[:, :n_context].any()
    assert torch.equal(ratio, counts.float() / n_target) and bool((counts >= 1).all())
    # eval_llada.py: x = round(linspace(k, k + (b - 1) T / b, b)); x = ((x - 1) mod T) + 1 for one k in 1..T
    candidates = [((torch.round(torch.linspace(float(k), k + (rows - 1) * (n_target / rows), rows)).long() - 1)
                   % n_target) + 1 for k in range(1, n_target + 1)]
    assert any(torch.equal(counts, candidate) for candidate in candidates)


@given(st.integers(0, 6), st.integers(1, 30), st.integers(1, 16), st.integers(0, 2**31))
@settings(max_examples=300, deadline=None)
def test_dream_draws_follow_dllm_s_stratified_times_and_keep_the_ends(n_context, n_target, rows, seed) -> None:
    eps = 1e-3
    masks, ratio = DreamProtocol(sampling_eps=eps).draw(n_context, n_target, rows, torch.Generator().manual_seed(seed))
    assert not masks[:, :n_context].any() and not masks[:, 0].any() and not masks[:, -1].any()
    t = (ratio - eps) / (1 - eps)
    assert bool(((t >= -1e-6) & (t < 1 + 1e-6)).all())
    steps = (t - t[0]) * rows  # t_i = (u + i / rows) mod 1: t_i - t_0 = i / rows (mod 1)
    assert torch.allclose(steps - torch.round(steps), torch.zeros(rows), atol=1e-4)
    assert sorted(torch.round(steps).long().remainder(rows).tolist()) == list(range(rows))


# ----- the estimators, against the references written from their code ---------------------------------------
def llada_reference(model, prefix: torch.Tensor, target: torch.Tensor, draws, cfg: float, mask_id: int) -> float:
    """eval_llada.py's get_loglikelihood / get_logits, on the given draws (masks, p)."""
    seq = torch.cat([prefix, target])[None]
    prompt_index = torch.arange(seq.shape[1]) < len(prefix)
    losses = []
    for is_mask, p in draws:
        batch = torch.where(is_mask, mask_id, seq.repeat(is_mask.shape[0], 1))
        if cfg > 0.0:
            un_batch = batch.clone()
            un_batch[:, prompt_index] = mask_id
            batch = torch.cat([batch, un_batch])
        logits = model(batch).logits
        if cfg > 0.0:
            logits, un_logits = torch.chunk(logits, 2, dim=0)
            logits = un_logits + (cfg + 1) * (logits - un_logits)
        p_mask = p[:, None].repeat(1, seq.shape[1])
        targets = seq.repeat(is_mask.shape[0], 1)
        loss = F.cross_entropy(logits[is_mask], targets[is_mask], reduction="none") / p_mask[is_mask]
        losses.append(float(loss.sum() / is_mask.shape[0]))
    return -sum(losses) / len(losses)


def dream_reference(model, prefix: torch.Tensor, target: torch.Tensor, draws) -> float:
    """dllm's DreamEvalHarness._eval_target_nll_mc (log_type ftb) with its shifted logits, negated."""
    seq = torch.cat([prefix, target])[None]
    losses = []
    for mask_indices, p in draws:
        perturbed = torch.where(mask_indices, model.config.mask_token_id, seq.repeat(mask_indices.shape[0], 1))
        logits = model(perturbed).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        p_mask = p[:, None].repeat(1, seq.shape[1])
        targets = seq.repeat(mask_indices.shape[0], 1)
        loss = F.cross_entropy(logits[mask_indices], targets[mask_indices], reduction="none") / p_mask[mask_indices]
        losses.append(float(loss.sum() / mask_indices.shape[0]))
    return -sum(losses) / len(losses)


@pytest.mark.parametrize("cfg", [0.0, 0.5, 2.0])
def test_the_estimate_is_llada_s_formula_on_fixed_masks(bpe_wrapper, cfg) -> None:
    ids = bpe_wrapper.tokenizer(CONTEXT + "Paris. The capital of Spain")["input_ids"]
    prefix, target = torch.tensor(ids[:20]), torch.tensor(ids[20:])
    generator = torch.Generator().manual_seed(5)
    draws = [LLaDAProtocol().draw(len(prefix), len(target), 4, generator) for _ in range(3)]
    with torch.no_grad():
        expected = llada_reference(bpe_wrapper.model.eval(), prefix, target, draws, cfg, bpe_wrapper.mask_token_id)
        value = monte_carlo_loglikelihood(bpe_wrapper.view, torch.cat([prefix, target]), len(prefix), draws, cfg)
    assert value == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_loglikelihood_is_llada_s_estimate_with_its_defaults(bpe_wrapper, cfg) -> None:
    lm = BilevelDLM(wrapper=bpe_wrapper, batch_size=8, cfg_scale=cfg, is_check_greedy=False)
    assert lm.mc_num == 128 and lm.protocol.name == "llada"
    (value, greedy), = lm.loglikelihood([request("loglikelihood", CONTEXT, CONTINUATION + " is the capital")])
    context, target = TemplateLM._encode_pair(lm, CONTEXT, CONTINUATION + " is the capital")
    generator = torch.Generator().manual_seed(lm.seed)
    draws = [LLaDAProtocol().draw(len(context), len(target), 8, generator) for _ in range(16)]
    with torch.no_grad():
        expected = llada_reference(bpe_wrapper.model.eval(), torch.tensor(context), torch.tensor(target), draws, cfg,
                                   bpe_wrapper.mask_token_id)
    assert value == pytest.approx(expected, abs=1e-6) and greedy is False


def llada_greedy_reference(model, prefix: torch.Tensor, target: torch.Tensor, mask_id: int) -> torch.Tensor:
    """eval_llada.py's suffix_greedy_prediction (cfg 0): the decoded continuation."""
    seq = torch.full((1, len(prefix) + len(target)), mask_id)
    seq[0, :len(prefix)] = prefix
    for _ in range(len(target)):
        mask_index = seq == mask_id
        logits = model(seq).logits[mask_index]
        x0 = torch.argmax(logits, dim=-1)
        p = torch.softmax(logits.to(torch.float32), dim=-1)
        confidence = torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)).squeeze(dim=-1)
        _, index = torch.sort(confidence, descending=True)
        x0[index[1:]] = mask_id
        seq[mask_index] = x0.clone()
    return seq[0, len(prefix):]


def test_is_greedy_is_llada_s_one_token_per_step_decoding(bpe_wrapper) -> None:
    prefix = torch.tensor(bpe_wrapper.tokenizer(CONTEXT)["input_ids"])
    with torch.no_grad():
        decoded = llada_greedy_reference(bpe_wrapper.model.eval(), prefix, torch.zeros(6, dtype=torch.long),
                                         bpe_wrapper.mask_token_id)
    assert greedy_reproduces(bpe_wrapper.view, torch.cat([prefix, decoded]), len(prefix))
    changed = decoded.clone()
    changed[2] = 5 if int(decoded[2]) != 5 else 6
    assert not greedy_reproduces(bpe_wrapper.view, torch.cat([prefix, changed]), len(prefix))
    lm = BilevelDLM(wrapper=bpe_wrapper, mc_num=2, batch_size=2)
    assert lm.is_check_greedy and lm.score_tokens(prefix.tolist(), decoded.tolist(), None, lm.protocol)[1] is True
    assert lm.score_tokens(prefix.tolist(), changed.tolist(), None, lm.protocol)[1] is False


@pytest.mark.parametrize("context,continuation", [("mary went to the kitchen . where is mary ? answer :", " kitchen"),
                                                  ("john is in the garden . where is john ? answer : ", "garden")])
def test_dream_is_scored_by_dllm_s_rule(dream_wrapper, context, continuation) -> None:
    lm = BilevelDLM(wrapper=dream_wrapper, batch_size=16)
    assert (lm.protocol.name, lm.mc_num, lm.is_check_greedy) == ("dream", 128, False)
    (value, greedy), = lm.loglikelihood([request("loglikelihood", context, continuation)])
    tokenizer = dream_wrapper.tokenizer
    spaces = len(context) - len(context.rstrip())  # dllm's _encode_pair
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation) + [tokenizer.eos_token_id]
    prefix = tokenizer.encode(context)
    target = whole[len(prefix):]
    generator = torch.Generator().manual_seed(lm.seed)
    draws = [DreamProtocol().draw(len(prefix), len(target), 16, generator) for _ in range(8)]
    with torch.no_grad():
        expected = dream_reference(dream_wrapper.model.eval(), torch.tensor(prefix), torch.tensor(target), draws)
    assert value == pytest.approx(expected, abs=1e-6) and greedy is False
    assert target[-1] == tokenizer.eos_token_id


def test_an_empty_context_under_the_dream_rule_scores_every_continuation_token(dream_wrapper) -> None:
    """lm-eval's prefix token as the context and dllm's EOS at the end: the one word is scored (masked in
    some draws), not left in a never-masked end position."""
    lm = recording(dream_wrapper, batch_size=16)
    tokenizer = dream_wrapper.tokenizer
    (value, _), = lm.loglikelihood([request("loglikelihood", "", " kitchen")])
    kitchen = tokenizer(" kitchen", add_special_tokens=False)["input_ids"]
    assert lm.scored == [([tokenizer.bos_token_id], kitchen + [tokenizer.eos_token_id])] and len(kitchen) == 1
    assert value < -1e-3


def test_lm_eval_s_batch_size_forms_are_taken(bpe_wrapper) -> None:
    assert [BilevelDLM(wrapper=bpe_wrapper, batch_size=size).batch_size for size in ("auto", "auto:4", "3", 2)] == \
        [1, 1, 3, 2]


def test_protocol_settings_are_checked(bpe_wrapper) -> None:
    with pytest.raises(ValueError, match="settings of the dream protocol"):
        BilevelDLM(wrapper=bpe_wrapper, sampling_eps=0.01)
    with pytest.raises(ValueError, match="protocol must be one of"):
        BilevelDLM(wrapper=bpe_wrapper, protocol="ar")
    with pytest.raises(ValueError, match="exceeds the model's maximum length"):
        BilevelDLM(wrapper=bpe_wrapper, max_length=100_000)
    lm = BilevelDLM(wrapper=bpe_wrapper, protocol="dream", sampling_eps=0.01, add_bos_token=False)
    assert lm.protocol.sampling_eps == 0.01


def test_strings_and_rolling_windows_are_encoded_as_lm_eval_s_hf_model_encodes_them() -> None:
    """lm-eval's own HFLM (over the same model and a BOS-adding tokenizer) gives the ids our tok_encode gives,
    with and without a BOS already at the start of the string (a chat template's), and the rolling windows are
    lm-eval's windows over HFLM's encoding."""
    from lm_eval.models.huggingface import HFLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    wrapper = MemoryWrapper(tiny_model("llada", tokenizer).double(), recipe(), tokenizer=tokenizer)
    hf = HFLM(pretrained=wrapper.model, tokenizer=tokenizer, backend="causal", device="cpu")
    lm = recording(wrapper, mc_num=2, batch_size=2, max_length=12)
    for text in ("mary went to the kitchen .", "<bos> mary went to the kitchen ."):
        assert lm.tok_encode(text) == hf.tok_encode(text)
    text = "mary went to the kitchen . john went to the garden . where is mary ?"
    lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(hf.tok_encode(text), hf.prefix_token_id,
                                                                           11, 1)]
    assert lm.scored == [(list(c), list(t)) for c, t in windows] and len(windows) > 1
