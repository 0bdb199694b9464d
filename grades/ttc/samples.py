"""Samples files: the JSONL format read by ``grades ttc`` and written by :func:`write_samples`.

Format
------
UTF-8 text (a leading byte-order mark is ignored), one JSON object per line, one line per
(checkpoint, problem). Blank lines are ignored.

.. code-block:: text

    {"checkpoint": "step-200", "train_flops": 1.2e15, "problem": 17,
     "samples": [{"answer": "82", "correct": true, "score": -0.31},
                 {"answer": "81", "correct": false, "score": -1.7}]}

Fields:

``checkpoint`` (string, required)
    Name of the checkpoint that produced the samples.
``train_flops`` (number, required)
    Training FLOPs spent to reach that checkpoint (a float, e.g. ``1.2e15``; finite, >= 0). Every
    line of one checkpoint must give the same value.
``problem`` (string or integer, required)
    Problem identifier; unique within a checkpoint. ``17`` and ``"17"`` are different problems.
``samples`` (array, required, non-empty)
    The n samples drawn for that problem at that checkpoint, each an object with

    * ``answer`` (string, required): the extracted final answer; majority voting compares these
      strings exactly, so normalise them before writing. All samples of a problem with one answer
      must have the same ``correct``.
    * ``correct`` (boolean, required): the verifier's verdict.
    * ``score`` (number, optional): a scorer's value (higher is better) for best-of-k. Best-of-k
      is available for a checkpoint only when every sample of every problem has a score.

Any other field, on the line or in a sample, is ignored (``completion``, ``tokens``, ... are fine).

Malformed lines -- bytes that are not UTF-8, invalid JSON, a missing or mistyped field, an empty
``samples`` array, one answer marked both correct and incorrect, a duplicated (checkpoint,
problem), a ``train_flops`` that disagrees with earlier lines of the same checkpoint -- are
reported with their 1-based line number and, with ``on_bad_line="skip"`` (default) skipped, with
``on_bad_line="error"`` refused (:class:`SamplesFormatError`). Refused in both modes: negative or
non-finite ``train_flops``, a file without any valid line, and a checkpoint named only on
malformed lines (skipping them would drop the whole checkpoint, perhaps the final one).

Checkpoints should share their problems: :func:`common_problems` keeps the problems present in
every checkpoint, which is what the table and the selection compare.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Sample", "CheckpointSamples", "SamplesFormatError", "LoadReport", "load_samples",
           "write_samples", "common_problems", "samples_from_completions"]

ProblemId = str | int


class SamplesFormatError(ValueError):
    """A samples file (or in-memory table) that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Sample:
    """One drawn completion: its extracted ``answer``, the verifier's ``correct`` and an optional
    scorer value ``score`` (higher is better)."""

    answer: str
    correct: bool
    score: float | None = None


@dataclass
class CheckpointSamples:
    """All samples of one checkpoint: ``problems[problem_id]`` is the list of its n samples.

    ``train_flops`` is the training compute spent to reach the checkpoint, in FLOPs (float).
    """

    name: str
    train_flops: float
    problems: dict[ProblemId, list[Sample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError("checkpoint name must be a non-empty string")
        f = _flops(self.train_flops, f"checkpoint {self.name!r}")
        self.train_flops = f

    @property
    def problem_ids(self) -> list[ProblemId]:
        return list(self.problems)

    def correct(self) -> list[list[bool]]:
        """``[P][n_p]`` verdicts in problem order."""
        return [[s.correct for s in v] for v in self.problems.values()]

    def answers(self) -> list[list[str]]:
        """``[P][n_p]`` answers in problem order."""
        return [[s.answer for s in v] for v in self.problems.values()]

    def scores(self) -> list[list[float]] | None:
        """``[P][n_p]`` scores, or None when any sample lacks one."""
        out = []
        for v in self.problems.values():
            if any(s.score is None for s in v):
                return None
            out.append([float(s.score) for s in v])
        return out

    @property
    def min_samples(self) -> int:
        """Smallest n over problems (0 when there are no problems)."""
        return min((len(v) for v in self.problems.values()), default=0)


@dataclass
class LoadReport:
    """What :func:`load_samples` skipped: ``bad_lines`` is a list of ``(line_number, reason)``;
    ``bad_checkpoints`` maps the checkpoint named on a skipped line (where it could be read) to
    those lines' numbers."""

    lines_read: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    bad_checkpoints: dict[str, list[int]] = field(default_factory=dict)


def _finite(v) -> bool:
    """Whether a JSON number is a finite float (an integer too large for a float is not)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _flops(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{where}: train_flops must be a number, got {type(v).__name__}")
    if not _finite(v) or v < 0:
        raise ValueError(f"{where}: train_flops must be finite and >= 0, got {_show(v)}")
    return float(v)


class _BadLine(Exception):
    pass


def _parse_sample(obj, j: int) -> Sample:
    if not isinstance(obj, dict):
        raise _BadLine(f"samples[{j}] is not an object")
    if "answer" not in obj or "correct" not in obj:
        raise _BadLine(f"samples[{j}] needs 'answer' and 'correct'")
    ans, cor = obj["answer"], obj["correct"]
    if not isinstance(ans, str):
        raise _BadLine(f"samples[{j}].answer must be a string")
    if not isinstance(cor, bool):
        raise _BadLine(f"samples[{j}].correct must be true or false")
    sc = obj.get("score")
    if sc is not None:
        if isinstance(sc, bool) or not isinstance(sc, (int, float)) or not _finite(sc):
            raise _BadLine(f"samples[{j}].score must be a finite number")
        sc = float(sc)
    return Sample(ans, cor, sc)


def _conflict(samples: Sequence[Sample]) -> str | None:
    """Why ``samples`` cannot vote (one answer marked both correct and incorrect), or None."""
    verdict: dict[str, bool] = {}
    for j, smp in enumerate(samples):
        if verdict.setdefault(smp.answer, smp.correct) != smp.correct:
            return (f"answer {smp.answer!r} is marked both correct and incorrect (samples[{j}]); "
                    "one answer needs one verdict")
    return None


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else f"{r[:20]}...({len(r)} characters)"


def load_samples(path: str | os.PathLike, *, on_bad_line: str = "skip",
                 report: LoadReport | None = None) -> list[CheckpointSamples]:
    """Read a samples JSONL file (format in this module's docstring).

    Args:
        path: the file.
        on_bad_line: ``"skip"`` (malformed lines are recorded in ``report`` and skipped) or
            ``"error"`` (the first one raises :class:`SamplesFormatError` with its line number).
        report: filled with the lines read and the skipped lines, if given.

    Returns:
        Checkpoints in order of first appearance, each with its problems in file order.

    Raises:
        SamplesFormatError: a malformed line with ``on_bad_line="error"``; in either mode negative
            or non-finite ``train_flops``, a checkpoint named only on malformed lines, or no valid
            line at all.
        OSError: the file cannot be read (missing, a directory, no permission).
        TypeError: ``path`` is not a str/bytes/PathLike (an int file descriptor is refused) or
            ``report`` is not a :class:`LoadReport`.
    """
    if isinstance(path, (bool, int)) or not isinstance(path, (str, bytes, os.PathLike)):
        # an int would be opened as a file descriptor
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if on_bad_line not in ("skip", "error"):
        raise ValueError(f"on_bad_line must be 'skip' or 'error', got {on_bad_line!r}")
    if report is not None and not isinstance(report, LoadReport):
        raise TypeError(f"report must be a LoadReport or None, got {type(report).__name__}")
    rep = report if report is not None else LoadReport()
    cks: dict[str, CheckpointSamples] = {}
    # undecodable bytes become lone surrogates here and are reported per line below
    with open(path, "r", encoding="utf-8-sig", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            rep.lines_read += 1
            obj = None
            try:
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError as e:
                    try:  # still read the checkpoint's name, for the guard against dropping it whole
                        obj = json.loads(line)
                    except (ValueError, RecursionError):
                        pass
                    raise _BadLine(f"not valid UTF-8 (byte 0x{ord(line[e.start]) - 0xDC00:02x} at "
                                   f"character {e.start + 1})") from None
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise _BadLine(f"invalid JSON ({getattr(e, 'msg', e)})") from None
                if not isinstance(obj, dict):
                    raise _BadLine("not a JSON object")
                for key in ("checkpoint", "train_flops", "problem", "samples"):
                    if key not in obj:
                        raise _BadLine(f"missing field '{key}'")
                name, flops, prob, samples = (obj["checkpoint"], obj["train_flops"], obj["problem"],
                                              obj["samples"])
                if not isinstance(name, str) or not name:
                    raise _BadLine("'checkpoint' must be a non-empty string")
                if isinstance(flops, bool) or not isinstance(flops, (int, float)):
                    raise _BadLine("'train_flops' must be a number")
                if not _finite(flops) or flops < 0:
                    raise SamplesFormatError(f"line {lineno}: train_flops must be finite and >= 0, "
                                             f"got {_show(flops)} (checkpoint {name!r})")
                if isinstance(prob, bool) or not isinstance(prob, (str, int)):
                    raise _BadLine("'problem' must be a string or an integer")
                if not isinstance(samples, list) or not samples:
                    raise _BadLine("'samples' must be a non-empty array")
                parsed = [_parse_sample(s, j) for j, s in enumerate(samples)]
                why = _conflict(parsed)
                if why:
                    raise _BadLine(why)
                ck = cks.get(name)
                if ck is not None and ck.train_flops != float(flops):
                    raise _BadLine(f"train_flops {flops!r} differs from {ck.train_flops!r} given "
                                   f"earlier for checkpoint {name!r}")
                if ck is not None and prob in ck.problems:
                    raise _BadLine(f"problem {_show(prob)} repeated for checkpoint {name!r}")
                if ck is None:
                    ck = cks[name] = CheckpointSamples(name, float(flops))
                ck.problems[prob] = parsed
            except _BadLine as e:
                if on_bad_line == "error":
                    raise SamplesFormatError(f"line {lineno}: {e}") from None
                rep.bad_lines.append((lineno, str(e)))
                name = obj.get("checkpoint") if isinstance(obj, dict) else None
                if isinstance(name, str) and name:
                    rep.bad_checkpoints.setdefault(name, []).append(lineno)
    lost = {n: lines for n, lines in rep.bad_checkpoints.items() if n not in cks}
    if lost:
        n, lines = next(iter(lost.items()))
        why = dict(rep.bad_lines)[lines[0]]
        raise SamplesFormatError(f"checkpoint {n!r} appears only on malformed lines ({_lines(lines)}; "
                                 f"line {lines[0]}: {why}); skipping them would drop the whole "
                                 "checkpoint: fix or remove them")
    if not cks:
        raise SamplesFormatError(f"{os.fspath(path)}: no valid lines (read {rep.lines_read}, "
                                 f"{len(rep.bad_lines)} malformed)")
    return list(cks.values())


def _lines(lines: list[int]) -> str:
    more = f" and {len(lines) - 5} more" if len(lines) > 5 else ""
    return f"line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:5]))}{more}"


def _problem_id(pid, where: str) -> ProblemId:
    """A problem id as the format has it: a string or an int (numpy integers converted)."""
    if isinstance(pid, (bool, np.bool_)) or not isinstance(pid, (str, numbers.Integral)):
        raise TypeError(f"{where}: problem ids must be strings or integers, got {_show(pid)} "
                        f"({type(pid).__name__})")
    return pid if isinstance(pid, str) else int(pid)


def _verdict(v, where: str) -> bool:
    """A verifier's verdict: a bool or 0/1 (numpy bools and integers too); never truthiness."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral) and v in (0, 1):
        return bool(v)
    raise TypeError(f"{where}: a verdict must be a bool or 0/1, got {_show(v)} ({type(v).__name__})")


def _score(v, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not _finite(v):
        raise ValueError(f"{where}: a score must be a finite number, got {_show(v)}")
    return float(v)


def write_samples(path: str | os.PathLike, checkpoints: Iterable[CheckpointSamples]) -> int:
    """Write checkpoints to ``path`` in the JSONL format above; returns the number of lines.

    Every record is checked before the file is touched (problem ids strings or integers, answers
    strings, verdicts bools, scores finite), and the file is replaced atomically: an error leaves
    an existing file as it was.
    """
    out: list[str] = []
    seen: dict[str, float] = {}
    done: set = set()
    for ck in checkpoints:
        if not isinstance(ck, CheckpointSamples):
            raise TypeError("write_samples takes CheckpointSamples objects "
                            "(see samples_from_completions)")
        if not isinstance(ck.name, str) or not ck.name:
            raise TypeError("checkpoint name must be a non-empty string")
        flops = _flops(ck.train_flops, f"checkpoint {ck.name!r}")
        if seen.setdefault(ck.name, flops) != flops:
            raise ValueError(f"checkpoint {ck.name!r} is given twice with different train_flops")
        for prob, samples in ck.problems.items():
            where = f"checkpoint {ck.name!r}, problem {_show(prob)}"
            prob = _problem_id(prob, f"checkpoint {ck.name!r}")
            if (ck.name, prob) in done:
                raise ValueError(f"{where}: repeated")
            done.add((ck.name, prob))
            if not samples:
                raise ValueError(f"{where}: no samples")
            recs = []
            for j, s in enumerate(samples):
                if not isinstance(s, Sample) or not isinstance(s.answer, str):
                    raise TypeError(f"{where}, samples[{j}]: need a Sample with a string answer")
                sc = _score(s.score, f"{where}, samples[{j}]")
                recs.append({"answer": s.answer, "correct": _verdict(s.correct, f"{where}, samples[{j}]"),
                             **({} if sc is None else {"score": sc})})
            rec = {"checkpoint": ck.name, "train_flops": flops, "problem": prob, "samples": recs}
            out.append(json.dumps(rec, allow_nan=False) + "\n")
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(out)
        try:  # mkstemp makes the file private; keep the mode of the file replaced
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(out)


def samples_from_completions(name: str, train_flops: float, problem_ids: Sequence[ProblemId],
                             answers: Sequence[Sequence[str]], correct: Sequence[Sequence[bool]],
                             scores: Sequence[Sequence[float]] | None = None) -> CheckpointSamples:
    """Build a :class:`CheckpointSamples` from in-memory ``[P][n]`` answers/verdicts(/scores)."""
    if not (len(problem_ids) == len(answers) == len(correct)):
        raise ValueError("problem_ids, answers and correct must have one entry per problem")
    if scores is not None and len(scores) != len(answers):
        raise ValueError("scores must have one entry per problem")
    ck = CheckpointSamples(name, train_flops)
    for i, pid in enumerate(problem_ids):
        if pid in ck.problems:
            raise ValueError(f"problem id {pid!r} repeated")
        if len(answers[i]) != len(correct[i]) or (scores is not None and len(scores[i]) != len(answers[i])):
            raise ValueError(f"problem {pid!r}: answers/correct/scores lengths differ")
        if not answers[i]:
            raise ValueError(f"problem {pid!r} has no samples")
        where = f"checkpoint {name!r}, problem {pid!r}, sample"
        ck.problems[pid] = [Sample(str(a), _verdict(c, f"{where} {j}"),
                                   None if scores is None else _score(scores[i][j], f"{where} {j}"))
                            for j, (a, c) in enumerate(zip(answers[i], correct[i]))]
        why = _conflict(ck.problems[pid])
        if why:
            raise ValueError(f"checkpoint {name!r}, problem {pid!r}: {why}")
    return ck


def common_problems(checkpoints: Sequence[CheckpointSamples]) -> tuple[list[CheckpointSamples], int]:
    """Restrict every checkpoint to the problems all of them have.

    Returns the restricted checkpoints (problem order of the first one) and how many distinct
    problem ids were dropped. Raises ``ValueError`` when there are no checkpoints, a checkpoint has
    no problems, or no problem is common to all.
    """
    if not checkpoints:
        raise ValueError("no checkpoints")
    for ck in checkpoints:
        if not ck.problems:
            raise ValueError(f"checkpoint {ck.name!r} has no problems")
    common = set(checkpoints[0].problems)
    every: set = set()
    for ck in checkpoints:
        common &= set(ck.problems)
        every |= set(ck.problems)
    if not common:
        raise ValueError("no problem is shared by all checkpoints")
    out = [CheckpointSamples(ck.name, ck.train_flops,
                             {p: ck.problems[p] for p in checkpoints[0].problems if p in common})
           for ck in checkpoints]
    return out, len(every) - len(common)
