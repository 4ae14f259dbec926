"""Examples and the prompt stream the rollout engine pulls from.

An :class:`Example` is task data before tokenization (question text, ground-truth
answer). A :class:`PromptSource` turns a deterministic example stream into the
engine's :class:`~tppo.rollout.PromptItem` s: it applies the prompt template (the
tokenizer's chat template when it has one), tokenizes, skips and counts prompts longer
than ``max_prompt_tokens``, and keeps a cursor so that a resumed run continues with
exactly the next prompt.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Iterator, Sequence

from tppo.config import ConfigError
from tppo.rollout.base import PromptItem


@dataclasses.dataclass
class Example:
    """One task item: ``prompt`` (question text, no template; or a conversation, a tuple of
    ``(role, content)`` pairs, hashable like a string), ``answer`` (ground truth the reward
    compares against), ``meta`` (anything else, e.g. the chain length)."""

    prompt: str | tuple[tuple[str, str], ...]
    answer: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def prompt_text(prompt: str | tuple) -> str:
    """A prompt as the reward sees it: the text, or a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    return next((content for role, content in reversed(prompt) if role == "user"), "")


def format_prompt(tokenizer, text: str | tuple, template: str = "{prompt}", system: str | None = None,
                  chat_template: bool = True) -> str:
    """The prompt string the model sees.

    ``template`` (with a ``{prompt}`` placeholder) wraps the question first, e.g. to ask
    for a boxed answer; only ``{prompt}`` is replaced, so other braces (``\\boxed{}``,
    JSON, LaTeX) stay as written. Then, if the tokenizer has a chat template and
    ``chat_template`` is on, the result becomes a user turn (after an optional system turn)
    with the generation prompt appended; otherwise it is sent as it is (a base model).

    A conversation (``(role, content)`` pairs, a dataset's list of messages) is rendered
    with the chat template as it stands: ``template`` wraps its last user turn, ``system``
    is prepended when it has no system turn of its own.
    """
    if isinstance(text, (tuple, list)):
        return _render_conversation(tokenizer, text, template, system, chat_template)
    body = template.replace("{prompt}", text)
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return body


def _render_conversation(tokenizer, turns, template: str, system: str | None, chat_template: bool) -> str:
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        raise ValueError("a conversational prompt (a list of messages) needs the tokenizer's chat template "
                         "(task.chat_template true, and a tokenizer that has one)")
    messages = [{"role": role, "content": content} for role, content in turns]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is not None:
        messages[last_user]["content"] = template.replace("{prompt}", messages[last_user]["content"])
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def problem_stream(task, split: str, seed: int) -> Iterator[Example]:
    """An endless, seeded stream of a split's examples from a task that samples problems
    (``task.name``, ``task.sample_problem(rng, split)``, ``task.example(problem)``)."""
    rng = random.Random(f"{task.name}:{split}:{seed}")
    while True:
        yield task.example(task.sample_problem(rng, split))


def first_distinct(stream: Iterator[Example], count: int, max_draws: int = 200_000) -> list[Example]:
    """The first ``count`` examples of an endless stream with distinct prompts (an
    evaluation set of distinct problems); an error, not a hang, when the split holds
    fewer distinct problems than that (none new in ``max_draws`` draws)."""
    seen: dict[str, Example] = {}
    for _ in range(max_draws):
        if len(seen) == count:
            return list(seen.values())
        example = next(stream)
        seen.setdefault(example.prompt, example)
    if len(seen) == count:
        return list(seen.values())
    raise ConfigError(f"only {len(seen)} distinct problems in {max_draws} draws of the held-out split, fewer than the "
                     f"{count} asked: lower task.eval_problems or enlarge the task's problem space")


def epoch_stream(examples: Sequence[Example], seed: int, shuffle: bool = True) -> Iterator[Example]:
    """Endless passes over a finite dataset, each pass in a fresh seeded order."""
    if not examples:
        raise ValueError("dataset is empty: no example to train on")
    epoch = 0
    while True:
        order = list(range(len(examples)))
        if shuffle:
            random.Random(f"{seed}:{epoch}").shuffle(order)
        for i in order:
            yield examples[i]
        epoch += 1


class PromptSource:
    """Tokenized, resumable prompt stream (an iterator of ``PromptItem``).

    Args:
        make_stream: builds the deterministic example stream from its start (called
            again on :meth:`load_state_dict`, then fast-forwarded to the cursor).
        tokenizer: a transformers tokenizer.
        max_prompt_tokens: longer prompts are skipped and counted in ``skipped_long``.
        template, system, chat_template: see :func:`format_prompt`.
    """

    def __init__(
        self,
        make_stream: Callable[[], Iterator[Example]],
        tokenizer,
        *,
        max_prompt_tokens: int,
        template: str = "{prompt}",
        system: str | None = None,
        chat_template: bool = True,
    ) -> None:
        self.make_stream, self.tokenizer = make_stream, tokenizer
        self.max_prompt_tokens, self.template, self.system = max_prompt_tokens, template, system
        self.chat_template = chat_template
        self._stream = make_stream()
        self.cursor = 0  # examples consumed from the stream (used or skipped)
        self.skipped_long = 0
        self.skipped_empty = 0

    def __iter__(self) -> "PromptSource":
        return self

    def __next__(self) -> PromptItem:
        while True:
            example = next(self._stream)
            prompt_id = self.cursor
            self.cursor += 1
            ids = self.encode(example.prompt)
            if not ids:
                self.skipped_empty += 1
            elif len(ids) > self.max_prompt_tokens:
                self.skipped_long += 1
            else:
                return PromptItem(prompt_id, ids, meta={"answer": example.answer, **example.meta})

    def encode(self, text: str | tuple) -> list[int]:
        formatted = self.render(text)
        # A chat template already contains the BOS token where the model wants one.
        return self.tokenizer(formatted, add_special_tokens=False).input_ids

    def render(self, text: str | tuple) -> str:
        """The prompt string the model sees (:func:`format_prompt` with this source's settings)."""
        return format_prompt(self.tokenizer, text, self.template, self.system, self.chat_template)

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "skipped_long": self.skipped_long, "skipped_empty": self.skipped_empty}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._stream = self.make_stream()
        for _ in range(state["cursor"]):
            next(self._stream)
        self.cursor = state["cursor"]
        self.skipped_long, self.skipped_empty = state["skipped_long"], state["skipped_empty"]
