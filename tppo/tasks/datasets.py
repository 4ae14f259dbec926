"""Dataset loaders: JSONL and Parquet files (always local), Hugging Face datasets by name,
and the training / held-out split of a dataset task (:func:`load_task_data`).

Each row gives a prompt field and an answer field (names configurable). The answer is
normalised by ``answer_format``:

* ``gsm8k``: a worked solution whose final line is ``#### <answer>`` (GSM8K);
* ``boxed``: a solution containing ``\\boxed{<answer>}`` (MATH, MATH-500); the last one;
* ``integer``: an integer, as a number or a string (AIME);
* ``raw``: the field as it is.

A malformed row raises :class:`DatasetError` naming the file, the line (1-based; the row
index for Parquet) and the field; with ``skip_bad_rows=True`` it is skipped instead and
its message kept in ``LoadedDataset.skipped``, so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any, Iterable

from tppo.rewards import last_boxed
from tppo.tasks.base import Example

ANSWER_FORMATS = ("gsm8k", "boxed", "integer", "raw")


class DatasetError(ValueError):
    """A dataset row is malformed; the message names the file, line and field."""


@dataclasses.dataclass
class LoadedDataset:
    examples: list[Example]
    skipped: list[str]  # one message per skipped row (file:line: reason)


def load_examples(
    path: str | Path,
    *,
    prompt_field: str = "question",
    answer_field: str = "answer",
    answer_format: str = "gsm8k",
    skip_bad_rows: bool = False,
) -> LoadedDataset:
    """Load a ``.jsonl`` / ``.json`` (one object per line) or ``.parquet`` file."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer_format {answer_format!r}; expected one of {', '.join(ANSWER_FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    return _to_examples(rows, prompt_field, answer_field, answer_format, skip_bad_rows)


def load_hf_examples(name: str, split: str = "train", *, config: str | None = None, prompt_field: str = "question",
                     answer_field: str = "answer", answer_format: str = "raw", skip_bad_rows: bool = False) -> LoadedDataset:
    """Load a Hugging Face dataset split by name (``openai/gsm8k``; downloaded, or read from
    the cache, ``HF_HUB_OFFLINE=1`` never downloading) or from a local dataset directory,
    and convert it like :func:`load_examples`. Needs the ``hf`` extra."""
    try:
        import datasets
    except ImportError as e:  # the extra is optional: say how to get it
        raise ImportError("loading datasets by name needs the 'datasets' package: pip install 'tppo[hf]'") from e
    where = f"dataset '{name}'" + (f" (config '{config}')" if config else "") + f", split '{split}'"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types (not found, offline, bad config, bad split): name the input
        hint = " (HF_HUB_OFFLINE=1: only datasets in the local cache can be loaded)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DatasetError(f"{where} could not be loaded{hint}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    rows = ((f"{name}[{split}]", i + 1, row, None) for i, row in enumerate(ds))
    return _to_examples(rows, prompt_field, answer_field, answer_format, skip_bad_rows)


@dataclasses.dataclass
class TaskData:
    """A dataset task's examples: ``train`` feeds the prompt stream, ``eval`` is held out;
    ``notes`` say where each came from and what was skipped (the trainer prints them)."""

    train: list[Example]
    eval: list[Example]
    notes: list[str]


def load_task_data(task, holdout_seed: int = 0) -> TaskData:
    """The training and evaluation examples of a ``file`` or ``hf`` task (``task`` is a
    ``TaskConfig``). Without an evaluation set, ``task.eval_problems`` training rows are
    held out: a seeded choice, removed from training together with every training row of
    the same question, so evaluation never scores a question the policy trained on."""
    fields = dict(prompt_field=task.prompt_field, answer_field=task.answer_field, answer_format=task.answer_format,
                  skip_bad_rows=task.skip_bad_rows)
    if task.name == "hf":
        load = lambda split: load_hf_examples(task.dataset, split, config=task.dataset_config, **fields)  # noqa: E731
        train_src, eval_src = task.train_split, task.eval_split
    else:
        load, train_src, eval_src = (lambda path: load_examples(path, **fields)), task.train_path, task.eval_path
    notes: list[str] = []
    if train_src is None:  # evaluation only (tppo eval): config.py allows it for files
        return TaskData([], _loaded(load(eval_src), eval_src, notes)[: task.eval_problems], notes)
    train = _loaded(load(train_src), train_src, notes)
    if eval_src is not None:
        return TaskData(train, _loaded(load(eval_src), eval_src, notes)[: task.eval_problems], notes)
    train, held = holdout(train, task.eval_problems, holdout_seed)
    notes.append(f"no evaluation set given (task.eval_path / task.eval_split): {len(held)} questions of {train_src} are held "
                 f"out for evaluation and removed from training ({len(train)} training rows remain)")
    return TaskData(train, held, notes)


def _loaded(ds: LoadedDataset, source: str, notes: list[str]) -> list[Example]:
    if ds.skipped:
        notes.append(f"skipped {len(ds.skipped)} malformed rows of {source}; first: {ds.skipped[0]}")
    return ds.examples


def holdout(examples: list[Example], count: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(rest, held): ``count`` examples of distinct questions chosen with ``seed``, and
    every example whose question is not among them. Refuses to hold out everything."""
    questions = list(dict.fromkeys(e.prompt for e in examples))
    if count >= len(questions):
        raise DatasetError(f"cannot hold out {count} evaluation questions from a training set of {len(questions)} distinct "
                           f"questions: give an evaluation set or lower task.eval_problems")
    chosen = set(random.Random(f"holdout:{seed}").sample(questions, count))
    held = list({e.prompt: e for e in examples if e.prompt in chosen}.values())
    return [e for e in examples if e.prompt not in chosen], held


# ---------------------------------------------------------------------- readers


def _jsonl_rows(path: Path) -> Iterable[tuple[str, int, Any, str | None]]:
    """(file, line, parsed row or None, error or None) per non-blank line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield str(path), lineno, None, f"not valid UTF-8 (byte {e.start})"
                continue
            if not text.strip():
                continue
            try:
                yield str(path), lineno, json.loads(text), None
            except json.JSONDecodeError as e:
                yield str(path), lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _parquet_rows(path: Path) -> Iterable[tuple[str, int, Any, str | None]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DatasetError(f"{path}: cannot read Parquet file ({e})") from e
    for i, row in enumerate(table.to_pylist()):
        yield str(path), i + 1, row, None


def _to_examples(rows, prompt_field, answer_field, answer_format, skip_bad_rows) -> LoadedDataset:
    examples, skipped = [], []
    for source, line, row, error in rows:
        try:
            if error is not None:
                raise DatasetError(f"{source}:{line}: {error}")
            examples.append(_example(source, line, row, prompt_field, answer_field, answer_format))
        except DatasetError as e:
            if not skip_bad_rows:
                raise
            skipped.append(str(e))
    return LoadedDataset(examples, skipped)


def _example(source, line, row, prompt_field, answer_field, answer_format) -> Example:
    where = f"{source}:{line}"
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in (prompt_field, answer_field):
        if field not in row or row[field] is None:
            raise DatasetError(f"{where}: missing field '{field}'")
    prompt = row[prompt_field]
    if isinstance(prompt, list):  # a conversation (TRL's conversational format): rendered with the chat template
        prompt = _conversation(prompt, f"{where}: field '{prompt_field}'")
    elif not isinstance(prompt, str):
        raise DatasetError(f"{where}: field '{prompt_field}' must be a string or a list of messages, got {type(prompt).__name__}")
    elif not prompt.strip():
        raise DatasetError(f"{where}: field '{prompt_field}' is empty")
    try:
        answer = normalize_answer(row[answer_field], answer_format)
    except ValueError as e:
        raise DatasetError(f"{where}: field '{answer_field}': {e}") from None
    meta = {k: v for k, v in row.items() if k not in (prompt_field, answer_field) and isinstance(v, (str, int, float, bool))}
    return Example(prompt=prompt, answer=answer, meta=meta)


def _conversation(messages: list, where: str) -> tuple[tuple[str, str], ...]:
    """A list of ``{"role", "content"}`` messages as (role, content) pairs, or the error
    naming the message that is not one."""
    if not messages:
        raise DatasetError(f"{where} is an empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DatasetError(f"{where}[{i}]: a message must be an object with string 'role' and 'content', got {m!r}"[:300])
        if m["role"] not in ("system", "user", "assistant"):
            raise DatasetError(f"{where}[{i}]: role {m['role']!r} is not system, user or assistant")
        out.append((m["role"], m["content"]))
    if not any(role == "user" for role, _ in out):
        raise DatasetError(f"{where} has no user message")
    return tuple(out)


# ---------------------------------------------------------------------- answers


def normalize_answer(value: Any, answer_format: str) -> str:
    """The ground-truth answer string of a row (see module docstring for formats)."""
    if answer_format == "integer":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected an integer, got {type(value).__name__}")
        text = str(value).strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"expected an integer, got {text!r}")
        return str(int(text))
    if not isinstance(value, str):
        if answer_format == "raw" and isinstance(value, (int, float)):
            return str(value)
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if answer_format == "gsm8k":
        if "####" not in value:
            raise ValueError("no '#### <answer>' line")
        answer = value.rsplit("####", 1)[1].strip().replace(",", "")
        if not answer:
            raise ValueError("empty answer after '####'")
        return answer
    if answer_format == "boxed":
        answer = last_boxed(value)
        if answer is None:
            raise ValueError("no \\boxed{...} answer")
        return answer
    return value.strip()
