"""Reward functions and the scorer that runs them safely.

A reward function is a plain function ``reward(prompt, completion, answer, **columns)``
returning a float (or a dict with ``score`` and extra named values), registered in
:data:`REWARD_FNS` or named as ``package.module:function`` / ``file.py:function``.
``completion`` is the decoded response (no prompt, no EOS); ``answer`` the ground truth
from the dataset; ``columns`` the example's other dataset columns. A *batched* reward
(``fn.batched = True``, or ``task.reward_batched``) takes lists, ``fn(prompts,
completions, answers, **columns)`` with each column a list, and returns a list: for a
reward that calls a model or a sandbox once per batch. Several rewards combine as their
weighted sum (``task.reward`` a list, ``task.reward_weights``), each logged by name.

:class:`RewardScorer` runs a batch of them in a pool of worker processes. A call that
raises, or runs past ``timeout_s`` (math-verify can hang on adversarial input such as
huge powers), scores 0 and is counted; it never stops training. Two guards: an alarm
inside the worker interrupts Python-level hangs after ``timeout_s``; a batch deadline
catches hangs inside C code (where no signal is handled) by restarting the pool.

This module imports nothing else of tppo's.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import inspect
import logging
import math
import multiprocessing
import re
import signal
from pathlib import Path
from typing import Callable

RewardFn = Callable[[str, str, str], float]


# ---------------------------------------------------------------------- answer extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), stripped; None if absent."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def final_answer(completion: str) -> str | None:
    """The completion's final answer: the last ``\\boxed{}``, else the text after the last
    ``####``, else the text after the last ``=`` (the embedded chain task); stripped."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    for marker in ("####", "="):
        if marker in completion:
            return completion.rsplit(marker, 1)[1].strip()
    return None


# ---------------------------------------------------------------------- reward functions


def exact_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 iff the completion's :func:`final_answer` equals ``answer`` exactly (stripped)."""
    return float(final_answer(completion) == answer.strip())


# Gold answers in a dataset row are bare ("(2, 2), (6, 2)", "\\frac{1}{2}", "3\\pi"): math-verify only
# reads them whole inside a LaTeX environment. A gold that already has one (or a \\boxed,
# e.g. a full worked solution) is parsed as it is. Numbers written with separators are
# the exception: "1 000" is 1 * 000 inside $...$ but 1000 to math-verify's number rules,
# and "1,22" / "1,000" is a decimal or thousands comma to those rules and a list inside
# $...$, so a bare gold of that shape is scored under both readings.
_LATEX_ENV = ("$", "\\(", "\\[", "\\boxed")
_SPACED_NUMBER = re.compile(r"[+-]?\d{1,3}( \d{3})+([.,]\d+)?")
_COMMA_NUMBER = re.compile(r"[+-]?\d+(,\d+)+(\.\d+)?")


def math_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 iff the completion's final answer equals ``answer`` mathematically.

    Both sides go through math-verify's own extraction, as its test suites define the
    verdicts (``compare_strings`` in math-verify's tests/test_all.py): LaTeX first with
    ``\\boxed{}`` at top priority, then plain expressions. So an answer split over several
    boxes (``\\boxed{(2, 2)} and \\boxed{(6, 2)}``, one box per solution) is read as the set
    of them, and units, thousands separators and ``#### 18`` lines are handled by
    math-verify. ``answer`` is a bare answer (wrapped in ``$...$`` to parse it whole) or
    LaTeX text / a worked solution (parsed as it is). Agreement with math-verify's
    suites is measured by benchmarks/math_reward_agreement.py. Timeouts are the scorer's
    job, so math-verify's signal-based ones are off (they fail off the main thread).
    """
    from math_verify import verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning: ours is on
    pred = _parse_math(completion)
    return float(bool(pred) and any(verify(gold, pred, timeout_seconds=None) for gold in _gold_readings(answer)))


def _gold_readings(answer: str) -> list[list]:
    """The parses of a gold answer that count (see ``_LATEX_ENV``); empty ones dropped."""
    bare = answer.strip()
    if any(env in bare for env in _LATEX_ENV) or _SPACED_NUMBER.fullmatch(bare):
        readings = [_parse_math(bare)]
    elif _COMMA_NUMBER.fullmatch(bare):
        readings = [_parse_math(f"${bare}$"), _parse_math(bare)]
    else:
        readings = [_parse_math(f"${bare}$") or _parse_math(bare)]
    return [g for g in readings if g]


def _parse_math(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(text, extraction_config=configs, parsing_timeout=None)


REWARD_FNS: dict[str, RewardFn] = {
    "exact": exact_reward,
    "math": math_reward,
}


# Functions loaded from a file (task.reward=path.py:fn) -> their spec: a spawned worker
# cannot import them by reference, so it resolves the spec itself.
_FILE_REWARDS: dict[Callable, str] = {}


class RewardSpecError(ValueError):
    """``task.reward`` names no reward that can be called as ``fn(prompt, completion, answer)``."""


def resolve_reward(spec: str) -> RewardFn:
    """The reward function ``spec`` names: a key of :data:`REWARD_FNS`, ``package.module:function``
    (imported as Python imports it) or ``path/to/file.py:function``. A function taking
    ``(prompt, completion, answer)`` and returning a float, at module level (workers
    receive it by reference)."""
    if spec in REWARD_FNS:
        return REWARD_FNS[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardSpecError(f"task.reward {spec!r} is not a registered reward ({', '.join(REWARD_FNS)}), "
                              f"nor package.module:function or path/to/file.py:function")
    module = _reward_module(spec, where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardSpecError(f"task.reward {spec!r}: {where} has no function {name!r}")
    try:
        inspect.signature(fn).bind_partial("prompt", "completion", "answer")
    except TypeError as e:
        raise RewardSpecError(f"task.reward {spec!r}: {name} must accept (prompt, completion, answer): {e}") from None
    except ValueError:  # a builtin without a signature: trust it
        pass
    if where.endswith(".py"):
        _FILE_REWARDS[fn] = spec
    return fn


def _reward_module(spec: str, where: str):
    import importlib
    import importlib.util
    import sys

    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise RewardSpecError(f"task.reward {spec!r}: no file {where}")
        name = f"tppo_reward_{path.stem}_{abs(hash(str(path))) % 10**8}"  # registered: forked workers find it by name
        if name not in sys.modules:
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            try:
                loader.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise RewardSpecError(f"task.reward {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
        return sys.modules[name]
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise RewardSpecError(f"task.reward {spec!r}: cannot import {where} ({e})") from None


def _needs_columns(fn: RewardFn) -> bool:
    """Whether ``fn`` has required parameters beyond (prompt, completion, answer)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except ValueError:
        return False
    named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return any(p.default is inspect.Parameter.empty for p in named[3:])


def is_batched(fn: RewardFn, flag: bool = False) -> bool:
    """Whether ``fn`` takes lists (its ``batched`` attribute, or ``task.reward_batched``)."""
    return flag or bool(getattr(fn, "batched", False))


def reward_specs(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def reward_name(spec: str) -> str:
    """The name a reward's value is logged under (``reward/<name>``): its function's name."""
    return spec.rpartition(":")[2]


def reward_names(given: list) -> list[str]:
    """Each reward's ``reward/<name>``: its function's name (:func:`reward_name`); where two
    rewards share it, their qualified names (``module.function``, so that neither value
    overwrites the other), numbered if even those repeat (the same reward listed twice)."""
    short = [reward_name(f) if isinstance(f, str) else getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(given)]
    full = [f.replace(":", ".") if isinstance(f, str) else f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', short[i])}"
            for i, f in enumerate(given)]
    out: list[str] = []
    for name, qualified in zip(short, full):
        base = qualified if short.count(name) > 1 else name
        name, k = base, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out.append(name)
    return out


def checked_rewards(spec: str | list[str], batched: bool = False) -> list[RewardFn]:
    """:func:`checked_reward` of each reward ``task.reward`` names."""
    return [checked_reward(s, batched) for s in reward_specs(spec)]


def checked_reward(spec: str, batched: bool = False) -> RewardFn:
    """:func:`resolve_reward`, then one call on a sample: what a run would meet at its first
    score, before any model loads."""
    fn = resolve_reward(spec)
    if _needs_columns(fn):  # it wants dataset columns a sample does not have: the signature check is all
        return fn
    sample = ("What is 1 + 1?", "1 + 1 = 2. The answer is \\boxed{2}.", "2")
    try:
        if is_batched(fn, batched):
            outs = fn(*([x] for x in sample))
            if not isinstance(outs, (list, tuple)) or len(outs) != 1:
                raise RewardSpecError(f"task.reward {spec!r} is batched: called on 1 completion it must return a list of 1 "
                                      f"value, got {type(outs).__name__} {outs!r}"[:300])
            out = outs[0]
        else:
            out = fn(*sample)
        value = float(out["score"] if isinstance(out, dict) else out)
    except RewardSpecError:
        raise
    except Exception as e:
        raise RewardSpecError(f"task.reward {spec!r}: a call on a sample raised {type(e).__name__}: {e}") from None
    if not math.isfinite(value):
        raise RewardSpecError(f"task.reward {spec!r}: a call on a sample returned {value}, not a finite number")
    return fn


# ---------------------------------------------------------------------- the scorer


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


@functools.lru_cache(maxsize=None)
def _worker_reward(spec: str) -> RewardFn:
    """A spawned worker's own copy of the reward ``spec`` names (a function from a file
    cannot be sent by reference)."""
    return resolve_reward(spec)


def row_kwargs(fn: RewardFn, row: dict | None) -> dict:
    """The dataset columns ``fn`` takes: all of them with ``**kwargs``, else those it names."""
    if not row:
        return {}
    try:
        params = inspect.signature(fn).parameters.values()
    except ValueError:
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(row)
    names = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in row.items() if k in names - {"prompt", "completion", "answer"}}


@contextlib.contextmanager
def _deadline(timeout_s: float):
    """Interrupt Python code running past ``timeout_s`` (SIGALRM: the main thread only)."""
    use_alarm = timeout_s > 0 and hasattr(signal, "setitimer")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _value(out) -> tuple[float, str | None, dict]:
    """A reward's return (a float, or a dict with ``score`` and extra named values) as
    (value, failure, extras); a non-finite value is an error scored 0."""
    extras = {k: float(v) for k, v in out.items() if k != "score"} if isinstance(out, dict) else {}
    value = float(out["score"] if isinstance(out, dict) else out)
    return (value, None, extras) if math.isfinite(value) else (0.0, "error", {})


def _score_one(fn: RewardFn | str, prompt: str, completion: str, answer: str, timeout_s: float,
               row: dict | None = None) -> tuple[float, str | None, dict]:
    """Run in a worker: (reward, None, extras) or (0.0, 'error'|'timeout', {}); ``fn`` a
    function or its spec; ``row`` the example's other dataset columns."""
    fn = _worker_reward(fn) if isinstance(fn, str) else fn
    try:
        with _deadline(timeout_s):
            return _value(fn(prompt, completion, answer, **row_kwargs(fn, row)))
    except _Timeout:
        return 0.0, "timeout", {}
    except Exception:
        return 0.0, "error", {}


def _score_batch(fn: RewardFn, prompts: list[str], completions: list[str], answers: list[str], rows: list[dict | None],
                 timeout_s: float) -> list[tuple[float, str | None, dict]]:
    """A batched reward, in this process: one call ``fn(prompts, completions, answers,
    **columns)`` (each column a list) within ``timeout_s``; a call that raises, runs out of
    time or returns the wrong number of values fails every response of the batch."""
    n = len(prompts)
    names = row_kwargs(fn, rows[0]) if rows and rows[0] else {}
    columns = {k: [(r or {}).get(k) for r in rows] for k in names}
    try:
        with _deadline(timeout_s):
            outs = fn(prompts, completions, answers, **columns)
        if not isinstance(outs, (list, tuple)) or len(outs) != n:
            return [(0.0, "error", {})] * n
        return [_value(out) for out in outs]
    except _Timeout:
        return [(0.0, "timeout", {})] * n
    except Exception:
        return [(0.0, "error", {})] * n


class RewardScorer:
    """Scores batches of completions with one reward function or a weighted sum of several.

    Args:
        fn: a reward function defined at module level (workers import it by
            reference), its name for :func:`resolve_reward`, or a list of either.
        weights: one weight per reward (default 1 each): the score is their weighted sum,
            each reward's own value kept in :attr:`last_extras` under its name.
        batched: every reward takes lists (else each function's ``batched`` attribute says).
        timeout_s: per-call limit (a batched reward's call scores the whole batch); a call
            past it scores 0 (counted in ``timeouts``).
        workers: worker processes for per-response rewards (0: score inline in this
            process, with the alarm guard only when running on the main thread). A batched
            reward runs in this process: it brings its own parallelism (a model, a sandbox).
        format_penalty: subtracted when the completion has no extractable final answer
            (an optional format term; 0 = off).
        batch_slack_s: the batch deadline is ``timeout_s + batch_slack_s`` plus the
            expected queueing, ``timeout_s * ceil(n / workers) / 4``.

    Counters (cumulative, one per response and reward): ``calls``, ``errors`` (raised or
    non-finite), ``timeouts``, ``pool_restarts``.
    """

    def __init__(self, fn: str | RewardFn | list, *, weights: list[float] | None = None, batched: bool = False,
                 timeout_s: float = 10.0, workers: int = 2, format_penalty: float = 0.0, batch_slack_s: float = 5.0) -> None:
        given = fn if isinstance(fn, list) else [fn]
        self.fns = [resolve_reward(f) if isinstance(f, str) else f for f in given]
        self.names = reward_names(given)
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.fns):
            raise ValueError(f"{len(self.weights)} reward weights for {len(self.fns)} rewards")
        self.batched = [is_batched(f, batched) for f in self.fns]
        self.timeout_s, self.workers = timeout_s, workers
        self.format_penalty, self.batch_slack_s = format_penalty, batch_slack_s
        self.calls = self.errors = self.timeouts = self.pool_restarts = 0
        self.last_extras: list[dict[str, float]] = []
        self._pool: cf.ProcessPoolExecutor | None = None

    @classmethod
    def from_task(cls, task, workers: int | None = None) -> "RewardScorer":
        """The scorer ``task`` (a ``TaskConfig``) describes; ``workers`` overrides its own."""
        return cls(task.reward, weights=task.reward_weights, batched=task.reward_batched, timeout_s=task.reward_timeout_s,
                   workers=task.reward_workers if workers is None else workers, format_penalty=task.format_penalty)

    def score(self, prompts: list[str], completions: list[str], answers: list[str], rows: list[dict] | None = None) -> list[float]:
        """One reward per completion; ``rows`` the examples' other dataset columns, passed to a
        reward that takes them. Extra values (a dict reward's, and each reward's own when
        there are several): :attr:`last_extras`."""
        if not (len(prompts) == len(completions) == len(answers)):
            raise ValueError("score: prompts, completions and answers must have the same length")
        rows = rows or [None] * len(prompts)
        args = list(zip(prompts, completions, answers, rows))
        rewards, self.last_extras = [0.0] * len(prompts), [{} for _ in prompts]
        for fn, name, weight, batched in zip(self.fns, self.names, self.weights, self.batched):
            if batched:
                results = _score_batch(fn, prompts, completions, answers, rows, self._inline_timeout())
            else:
                results = self._run_inline(fn, args) if self.workers == 0 else self._run_pool(fn, args)
            for i, (value, failure, extras) in enumerate(results):
                self.calls += 1
                self.errors += failure == "error"
                self.timeouts += failure == "timeout"
                rewards[i] += weight * value
                self.last_extras[i].update(extras)
                if len(self.fns) > 1:
                    self.last_extras[i][name] = value
        if self.format_penalty:
            rewards = [r - self.format_penalty if final_answer(c) is None else r for r, c in zip(rewards, completions)]
        return rewards

    def _inline_timeout(self) -> float:
        import threading

        return self.timeout_s if threading.current_thread() is threading.main_thread() else 0.0

    def _run_inline(self, fn, args):
        timeout = self._inline_timeout()
        return [_score_one(fn, p, c, a, timeout, row) for p, c, a, row in args]

    def _run_pool(self, fn, args):
        pool = self._ensure_pool()
        sent = _FILE_REWARDS.get(fn, fn)  # a function from a file goes as its spec, resolved in the worker
        futures = [pool.submit(_score_one, sent, p, c, a, self.timeout_s, row) for p, c, a, row in args]
        deadline = self.timeout_s + self.batch_slack_s + self.timeout_s * math.ceil(len(futures) / self.workers) / 4
        done, not_done = cf.wait(futures, timeout=deadline)
        if not_done:  # a call stuck where no signal reaches it: abandon the pool
            self._kill_pool()
        return [f.result() if f in done and f.exception() is None else (0.0, "timeout" if f in not_done else "error", {})
                for f in futures]

    def _ensure_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: workers never inherit torch's threads or CUDA state from the trainer.
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        self.pool_restarts += 1
        if pool is None:
            return
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        raise TypeError("RewardScorer holds a process pool and cannot be pickled")
