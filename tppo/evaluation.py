"""Evaluation: avg@k and pass@k over a dataset, given any generate function.

``avg@k`` is the mean accuracy over k samples per problem (the paper's AIME "avg@32");
``pass@k`` the probability that at least one of k samples is correct, estimated without
bias from n >= k samples (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code", eq. 1): 1 - C(n - c, k) / C(n, k) for c correct of n. ``avg@k``'s standard
error (:func:`avg_at_k_se`) is the noise to quote next to it: problems and samples both
vary (Miller 2024, "Adding Error Bars to Evals", clustered by problem).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from tppo.config import Config, RolloutConfig
from tppo.rewards import RewardScorer
from tppo.rollout import EmbeddedEngine
from tppo.tasks.base import Example, PromptSource, prompt_text

GenerateFn = Callable[[Sequence[str], int], list[list[str]]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c correct of n samples (numerically stable product form)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_k_se(correct: Sequence[Sequence[bool]]) -> float:
    """Standard error of avg@k under a two-stage resampling: problems with replacement,
    then each drawn problem's k samples with replacement.

    With m_i problem i's mean correctness over its k samples, p their mean and n problems,
    the resampled mean's variance is exactly

        SE^2 = [ (1/n) sum_i (m_i - p)^2  +  (1/n) sum_i m_i (1 - m_i) / k ] / n,

    the between-problem spread plus the sampling noise within a problem (a greedy
    evaluation, k = 1 or identical samples, has only the first term). This is the
    closed form of ``benchmarks/stats.eval_standard_error``'s bootstrap; it needs the
    same k for every problem. NaN with fewer than two problems.
    """
    rows = [[float(x) for x in r] for r in correct]
    if len(rows) < 2:
        return float("nan")
    k = len(rows[0])
    if k == 0 or any(len(r) != k for r in rows):
        raise ValueError(f"avg_at_k_se needs the same number of samples for every problem (got {sorted({len(r) for r in rows})})")
    n = len(rows)
    means = [sum(r) / k for r in rows]
    p = sum(means) / n
    between = sum((m - p) ** 2 for m in means) / n
    within = sum(m * (1.0 - m) for m in means) / (n * k)
    return ((between + within) / n) ** 0.5


@dataclasses.dataclass
class EvalResult:
    avg_at_k: float  # mean correctness over all samples
    pass_at_k: dict[int, float]  # k -> mean unbiased pass@k over problems
    correct: list[list[bool]]  # per problem, per sample
    completions: list[list[str]]
    rewards: list[list[float]] = dataclasses.field(default_factory=list)  # per problem, per sample


def evaluate(examples: Sequence[Example], generate: GenerateFn, scorer: RewardScorer, samples: int,
             ks: Sequence[int] = (1,)) -> EvalResult:
    """Generate ``samples`` completions per example, score them, aggregate.

    A completion counts as correct when its reward is >= 1 (rewards may carry a format
    term below 1 or negative).
    """
    completions = generate([e.prompt for e in examples], samples)
    flat = [(e, c) for e, cs in zip(examples, completions) for c in cs]
    rewards = scorer.score([prompt_text(e.prompt) for e, _ in flat], [c for _, c in flat], [e.answer for e, _ in flat],
                           [e.meta for e, _ in flat])  # the other dataset columns, for a reward that takes them
    correct = [[r >= 1.0 for r in rewards[i * samples : (i + 1) * samples]] for i in range(len(examples))]
    avg = sum(map(sum, correct)) / max(1, len(examples) * samples)
    passes = {k: sum(pass_at_k(samples, sum(c), k) for c in correct) / max(1, len(correct)) for k in ks if k <= samples}
    per_problem = [list(rewards[i * samples : (i + 1) * samples]) for i in range(len(examples))]
    return EvalResult(avg_at_k=avg, pass_at_k=passes, correct=correct, completions=completions, rewards=per_problem)


def engine_generate_fn(model: torch.nn.Module, tokenizer, *, max_response_tokens: int, batch_prompts: int = 16,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                       max_prompt_tokens: int = 4096, template: str = "{prompt}", system: str | None = None, chat_template: bool = True,
                       eos_token_ids: int | Sequence[int] | None = None, device: str | torch.device = "cpu",
                       progress: bool = False) -> GenerateFn:
    """A generate function on the embedded engine (synchronous, W = L). Prompts are
    formatted as in training (``template``, ``system``, the chat template); generation
    stops on any of ``eos_token_ids`` (default: the tokenizer's EOS). With ``progress``
    it says what it evaluates, and draws a bar of finished samples on a terminal."""

    def generate(prompts: Sequence[str], samples: int) -> list[list[str]]:
        examples = [Example(p, "") for p in prompts]
        source = PromptSource(lambda: iter(examples), tokenizer, max_prompt_tokens=max_prompt_tokens, template=template, system=system,
                              chat_template=chat_template)
        cfg = RolloutConfig(prompts_per_step=batch_prompts, samples_per_prompt=samples, window_tokens=max_response_tokens,
                            max_response_tokens=max_response_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        eos = tokenizer.eos_token_id if eos_token_ids is None else eos_token_ids
        engine = EmbeddedEngine(cfg, source, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, device=device)
        out: list[list[str]] = [[] for _ in prompts]
        bar = _progress_bar(len(prompts), samples) if progress else None
        while (wb := engine.generate_window(model, 0)).rows:
            for row in wb.rows:
                out[row.prompt_id].append(decode_response(tokenizer, row.response_ids))
            if bar is not None:
                bar.update(len(wb.rows))
        if bar is not None:
            bar.close()
        if source.skipped_long or source.skipped_empty:
            raise ValueError(f"evaluation: {source.skipped_long} prompts exceed max_prompt_tokens={max_prompt_tokens}, "
                             f"{source.skipped_empty} are empty; every evaluation prompt must be generated")
        return out

    return generate


def _progress_bar(problems: int, samples: int):
    """A bar on a terminal (tqdm, on stderr); elsewhere one line, so a log shows why it waits."""
    import sys

    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        print(f"evaluating {problems} problems x {samples} samples", flush=True)
    return tqdm(total=problems * samples, desc="evaluation", unit="sample", leave=False, disable=not sys.stderr.isatty())


def run_generate_fn(cfg: Config, model: torch.nn.Module, tokenizer, eos_token_ids: Sequence[int], device) -> GenerateFn:
    """The generate function of a run's evaluation: the run's prompt formatting (template,
    system prompt, prompt limit), sampling settings (temperature, top-p, top-k) and
    stop tokens, so that held-out prompts are built exactly as training prompts are.
    Used by the trainer and by ``tppo eval`` alike. Batches of ``log.eval_batch_rows`` rows
    (:func:`eval_batch_prompts`)."""
    t, r = cfg.task, cfg.rollout
    return engine_generate_fn(model, tokenizer, max_response_tokens=r.max_response_tokens, batch_prompts=eval_batch_prompts(cfg),
                              temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k, seed=r.seed + 7919, template=t.template, system=t.system, chat_template=t.chat_template,
                              max_prompt_tokens=t.max_prompt_tokens, eos_token_ids=eos_token_ids, device=device,
                              progress=cfg.log.progress)


def eval_batch_prompts(cfg: Config) -> int:
    """Problems per evaluation batch: ``log.eval_batch_rows`` rows (null: the training
    batch's prompts_per_step x samples_per_prompt) over ``log.eval_samples`` samples each,
    at least one problem."""
    rows = cfg.log.eval_batch_rows or cfg.rollout.num_slots
    return max(1, rows // cfg.log.eval_samples)


def decode_response(tokenizer, ids: Sequence[int]) -> str:
    """Response text without special tokens (the EOS that ended it, padding)."""
    return tokenizer.decode(ids, skip_special_tokens=True)
