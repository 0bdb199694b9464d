"""Embedded, verifiable tasks for demos and tests: multi-digit addition and digit sorting.

Everything is generated deterministically from a seed, needs no download, and every answer can
be checked exactly. Text is tokenised one character per token with a fixed vocabulary, so the
task works with any model built from a config (see :mod:`grades.demo.models`).

A sample reads ``"<bos>37+45=82<eos>"``: the prompt is ``"37+45="`` and the answer ``"82"``.
Training labels cover the answer and the end token only.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


@dataclass(frozen=True)
class Example:
    """One problem: ``prompt`` (e.g. ``"37+45="``) and its exact ``answer`` (``"82"``)."""

    prompt: str
    answer: str


class DigitTask:
    """What every embedded task shares: a character vocabulary, seeded train/val/test splits of
    :class:`Example`, exact verification and causal-LM batches. Subclasses set ``answer_len`` and
    ``prompt_len`` and generate the problems (:meth:`_problems`)."""

    name = "task"

    def __init__(self, seed: int, n_val: int, n_test: int, max_train: int):
        if n_val < 0 or n_test < 0:
            raise ValueError("n_val and n_test must be non-negative")
        self.seed = seed
        self.vocab = [PAD, BOS, EOS] + list("0123456789+=")
        self.stoi = {s: i for i, s in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        exs = self._problems(random.Random(seed), n_val + n_test + max_train)
        if n_val + n_test >= len(exs):
            raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training data "
                             f"({len(exs)} distinct problems exist)")
        self.val = exs[:n_val]
        self.test = exs[n_val:n_val + n_test]
        self.train = exs[n_val + n_test:n_val + n_test + max_train]

    def _problems(self, rng: random.Random, need: int) -> list[Example]:
        raise NotImplementedError

    @staticmethod
    def _distinct(rng: random.Random, total: int, need: int) -> list[int]:
        """``need`` distinct integers in ``[0, total)`` in a seeded random order (all if fewer)."""
        if total <= need:
            keys = list(range(total))
            rng.shuffle(keys)
            return keys
        seen: set[int] = set()
        keys = []
        while len(keys) < need:
            k = rng.randrange(total)
            if k not in seen:
                seen.add(k)
                keys.append(k)
        return keys

    # --- text <-> ids -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the task's vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Characters up to the first ``<eos>``; special tokens are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= 3:
                out.append(self.vocab[i])
        return "".join(out)

    # --- checking -------------------------------------------------------------------------------
    def verify(self, example: Example, completion: str) -> bool:
        """Exact match of the completion (text after the prompt, up to ``<eos>``) with the answer."""
        return completion.strip() == example.answer

    # --- batches --------------------------------------------------------------------------------
    def train_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Right-padded causal-LM batch: ``input_ids``, ``attention_mask``, ``labels`` (``[B, T]``,
        int64; labels are ``-100`` except on the answer and ``<eos>``)."""
        seqs, labs = [], []
        for ex in examples:
            p = [self.bos_id] + self.encode(ex.prompt)
            a = self.encode(ex.answer) + [self.eos_id]
            seqs.append(p + a)
            labs.append([-100] * len(p) + a)
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), t), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labs)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, :len(l)] = torch.tensor(l)
            mask[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def prompt_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Prompts for generation: ``input_ids`` and ``attention_mask`` ``[B, prompt_len]`` (all
        prompts have equal length, so no padding is needed)."""
        ids = torch.tensor([[self.bos_id] + self.encode(ex.prompt) for ex in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def iterate(self, batch_size: int, seed: int = 0, epochs: int | None = None
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled training batches, reshuffled every epoch; endless when ``epochs`` is None."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rng = random.Random(seed)
        order = list(range(len(self.train)))
        e = 0
        while epochs is None or e < epochs:
            rng.shuffle(order)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield self.train_batch([self.train[j] for j in order[i:i + batch_size]])
            e += 1


class AdditionTask(DigitTask):
    """``a + b`` with ``digits``-digit operands (leading zeros allowed), split into train/val/test.

    Args:
        digits: digits per operand (1-6).
        seed: seed of the problem order and split.
        n_val, n_test: sizes of the validation and test splits; the rest is training data
            (capped at ``max_train``).
        reverse_answer: write answers least-significant digit first (much easier for small
            models); ``verify`` handles either form.
    """

    name = "addition"

    def __init__(self, digits: int = 2, seed: int = 0, n_val: int = 200, n_test: int = 500,
                 max_train: int = 20000, reverse_answer: bool = False):
        if not 1 <= digits <= 6:
            raise ValueError(f"digits must be in [1, 6], got {digits}")
        self.digits, self.reverse_answer = digits, reverse_answer
        super().__init__(seed, n_val, n_test, max_train)

    def _problems(self, rng: random.Random, need: int) -> list[Example]:
        top = 10 ** self.digits
        fmt = f"{{:0{self.digits}d}}"
        out = []
        for k in self._distinct(rng, top * top, need):
            a, b = divmod(k, top)
            ans = str(a + b)
            out.append(Example(f"{fmt.format(a)}+{fmt.format(b)}=", ans[::-1] if self.reverse_answer else ans))
        return out

    @property
    def answer_len(self) -> int:
        """Longest answer in characters (``digits + 1``)."""
        return self.digits + 1

    @property
    def prompt_len(self) -> int:
        """Prompt length in tokens, including ``<bos>`` (all prompts have the same length)."""
        return 1 + 2 * self.digits + 2


class SortTask(DigitTask):
    """Sort a string of ``digits`` decimal digits: ``"31415="`` -> ``"11345"``.

    Each answer digit depends on the whole prompt (a count of smaller digits), yet a two-layer
    model learns it steadily, without the long loss plateau of carrying in addition: the task of
    ``grades demo``.

    Args:
        digits: length of the string (2-8).
        seed, n_val, n_test, max_train: as in :class:`AdditionTask`.
    """

    name = "sort"

    def __init__(self, digits: int = 5, seed: int = 0, n_val: int = 200, n_test: int = 500,
                 max_train: int = 20000):
        if not 2 <= digits <= 8:
            raise ValueError(f"digits must be in [2, 8], got {digits}")
        self.digits = digits
        super().__init__(seed, n_val, n_test, max_train)

    def _problems(self, rng: random.Random, need: int) -> list[Example]:
        out = []
        for k in self._distinct(rng, 10 ** self.digits, need):
            s = f"{k:0{self.digits}d}"
            out.append(Example(s + "=", "".join(sorted(s))))
        return out

    @property
    def answer_len(self) -> int:
        """Answer length in characters (``digits``)."""
        return self.digits

    @property
    def prompt_len(self) -> int:
        """Prompt length in tokens, including ``<bos>``."""
        return 1 + self.digits + 1


@torch.no_grad()
def generate_answers(model, task: DigitTask, examples: Sequence[Example], *, num_samples: int = 1,
                     do_sample: bool = False, temperature: float = 1.0, batch_size: int = 64,
                     seed: int | None = None) -> list[list[str]]:
    """Completions for each example: ``[len(examples)][num_samples]`` strings.

    Uses ``model.generate`` with ``num_return_sequences=num_samples`` in batches; greedy when
    ``do_sample`` is False. ``seed`` seeds torch's generator for reproducible sampling.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[str]] = []
    per = max(1, batch_size // num_samples)
    for i in range(0, len(examples), per):
        chunk = examples[i:i + per]
        batch = {k: v.to(device) for k, v in task.prompt_batch(chunk).items()}
        kwargs = dict(max_new_tokens=task.answer_len + 1, num_return_sequences=num_samples,
                      do_sample=do_sample, pad_token_id=task.pad_id, eos_token_id=task.eos_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        gen = model.generate(**batch, **kwargs)
        gen = gen[:, batch["input_ids"].shape[1]:].cpu().tolist()
        for j in range(len(chunk)):
            out.append([task.decode(g) for g in gen[j * num_samples:(j + 1) * num_samples]])
    model.train(was_training)
    return out


def greedy_accuracy(model, task: DigitTask, examples: Sequence[Example], batch_size: int = 128) -> float:
    """Exact-match accuracy of greedy decoding over ``examples`` (fraction in [0, 1])."""
    if not examples:
        raise ValueError("no examples to evaluate")
    comps = generate_answers(model, task, examples, batch_size=batch_size)
    return sum(task.verify(ex, c[0]) for ex, c in zip(examples, comps)) / len(examples)
