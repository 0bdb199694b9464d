"""``grades ttc SAMPLES.jsonl``: the offline test-time-compute table and (checkpoint, k) choice.

Reads a samples file (format: :mod:`grades.ttc.samples`) and prints, per strategy, the choice
with the fewest training FLOPs meeting the target (pass@k marked as the upper bound it is: it
assumes an oracle verifier), the overall choice (and, with ``--queries``, the one with the fewest
total FLOPs), the training FLOPs saved and the break-even query count Q*; ``--table`` adds the
accuracy of every (checkpoint, k, strategy). Q* needs the inference FLOPs of one sample:
``--infer-flops``, or the ``infer_flops_per_sample`` field the lines of ``grades demo``'s samples
file carry.
``--json`` also holds the saturating accuracy-vs-k fit of every (checkpoint, strategy) (k_max >= 4)
with its residuals and, where the fit passes its checks, the accuracy it extrapolates to k beyond
k_max (``extrapolated``; not measured, not used by the choice).

Exit codes: 0 a choice was found; 1 nothing meets the target; 2 bad input or arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

from .fits import fit_accuracy_vs_k
from .samples import LoadReport, SamplesFormatError, common_problems, load_samples
from .select import STRATEGIES, Candidate, Selection, select

__all__ = ["main", "build_parser", "DEFAULT_TOLERANCE"]

#: accuracy slack of the target, the same in ``grades ttc`` and ``grades demo``
DEFAULT_TOLERANCE = 0.02
#: optional field of a samples line: inference FLOPs of one sampled completion
INFER_FIELD = "infer_flops_per_sample"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grades ttc", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="samples JSONL file, one line per (checkpoint, problem)")
    p.add_argument("--target", default="final",
                   help="accuracy in [0, 1], 'final' (measured k=1 accuracy of the checkpoint with the "
                        "most training FLOPs; default) or 'projection' (the 95%% upper bound of the "
                        "accuracy projected to --final-flops)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"accuracy slack (default {DEFAULT_TOLERANCE}, as in grades demo)")
    p.add_argument("--table", action="store_true",
                   help="also print the accuracy of every (checkpoint, k, strategy)")
    p.add_argument("--k-max", type=int, default=None,
                   help="k budget (default: the smallest number of samples of any problem)")
    p.add_argument("--queries", type=float, default=None, help="expected query volume Q")
    p.add_argument("--infer-flops", type=float, default=None,
                   help=f"inference FLOPs of one sampled completion (for Q* and total FLOPs; default: "
                        f"the file's '{INFER_FIELD}' field, when its lines carry one)")
    p.add_argument("--final-flops", type=float, default=None,
                   help="training FLOPs of the full run (default: the largest checkpoint's)")
    p.add_argument("--strategies", nargs="+", default=None, metavar="S",
                   help=f"any of {', '.join(STRATEGIES)}, space- or comma-separated (default: all "
                        "available; pass@k assumes an oracle verifier at deployment)")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="write accuracy-vs-k curves here (.png, .pdf, .svg, ...: a matplotlib format)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full result as JSON here")
    p.add_argument("--on-bad-line", choices=("skip", "error"), default="skip",
                   help="malformed lines: skip them with a report on stderr (default) or stop (exit 2)")
    return p


def _fmt_q(q: float | None) -> str:
    if q is None:
        return "n/a (give --infer-flops)"
    if math.isinf(q):
        return "inf (no extra inference per query)"
    return f"{q:.4g} queries"


def _print_table(sel: Selection, out) -> None:
    strats = list(sel.strategies)
    cks: list[tuple[str, float]] = []
    for c in sel.table:
        if (c.checkpoint, c.train_flops) not in cks:
            cks.append((c.checkpoint, c.train_flops))
    cks.sort(key=lambda t: t[1])
    by = {(c.checkpoint, c.k, c.strategy): c for c in sel.table}
    w = max(10, max(len(n) for n, _ in cks))
    head = f"{'checkpoint':<{w}} {'train FLOPs':>11} {'k':>3} " + " ".join(f"{s:>17}" for s in strats)
    print(head, file=out)
    print("-" * len(head), file=out)
    for name, fl in cks:
        for k in range(1, sel.k_max + 1):
            cells = []
            for s in strats:
                c = by[(name, k, s)]
                se = "" if math.isnan(c.se) else f"±{c.se:.3f}"
                mark = "*" if c.meets else " "
                cells.append(f"{c.accuracy:.4f}{se:>7}{mark}".rjust(17))
            print(f"{name:<{w}} {fl:>11.4g} {k:>3} " + " ".join(cells), file=out)
    print("(* meets target - tolerance)", file=out)


def _describe(c: Candidate, sel: Selection, label: str, out) -> None:
    pct = 100.0 * c.train_flops_saved / sel.reference_flops if sel.reference_flops > 0 else 0.0
    print(f"{label}: {c.checkpoint} with {c.strategy}, k={c.k}: accuracy {c.accuracy:.4f}"
          + ("" if math.isnan(c.se) else f" ± {c.se:.4f}"), file=out)
    print(f"  training FLOPs {c.train_flops:.4g} (saved {c.train_flops_saved:.4g} = {pct:.1f}% vs "
          f"{sel.reference_flops:.4g}); break-even Q* = {_fmt_q(c.break_even)}", file=out)
    if c.total_flops is not None:
        print(f"  total FLOPs at Q={sel.queries:.4g}: {c.total_flops:.4g} "
              f"(reference {sel.reference_total_flops:.4g})", file=out)


def _infer_flops_from(path: str) -> float | None:
    """The ``infer_flops_per_sample`` the samples file's lines carry (the first positive finite
    value found; ``None`` when no line has one)."""
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        for line in fh:
            if INFER_FIELD not in line:
                continue
            try:
                v = json.loads(line).get(INFER_FIELD)
            except (ValueError, AttributeError):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
                return float(v)
    return None


def _per_strategy(common, sel: Selection, args, target, infer_flops) -> dict[str, Selection]:
    """One selection per strategy of ``sel`` (the same target and tolerance)."""
    return {s: select(common, k_max=sel.k_max, target=target, tolerance=args.tolerance, strategies=[s],
                      infer_flops_per_sample=infer_flops, final_train_flops=args.final_flops)
            for s in sel.strategies}


def _print_choices(per: dict[str, Selection], out) -> None:
    print("choice per strategy (fewest training FLOPs meeting the target):", file=out)
    for s, ps in per.items():
        c = ps.min_train
        bound = "  [upper bound: assumes an oracle verifier]" if s == "pass@k" else ""
        if c is None:
            print(f"  {s:<11} none meets the target{bound}", file=out)
            continue
        pct = 100.0 * c.train_flops_saved / ps.reference_flops if ps.reference_flops > 0 else 0.0
        print(f"  {s:<11} {c.checkpoint}, k={c.k}: accuracy {c.accuracy:.4f}, saves {pct:.1f}% of training "
              f"FLOPs, Q* = {_fmt_q(c.break_even)}{bound}", file=out)


def _k_fits(sel: Selection) -> dict:
    """Saturating accuracy-vs-k fit per (checkpoint, strategy), where k_max >= 4 allows one, with
    the fitted accuracy at the k beyond k_max that it may extrapolate to."""
    out: dict = {}
    if sel.k_max < 4:
        return out
    for (name, strat), est in sel.estimates.items():
        fit = fit_accuracy_vs_k(est.ks, est.mean, None if est.n_problems < 2 else est.se)
        d = out.setdefault(name, {})[strat] = fit.to_dict()
        beyond = range(sel.k_max + 1, int(fit.x_max + fit.max_extrapolation * (fit.x_max - fit.x_min)) + 1)
        d["extrapolated"] = [{"k": k, "accuracy": float(fit.predict(k))} for k in beyond] if fit.ok else []
    return out


def _report_skipped(rep: LoadReport) -> None:
    if rep.bad_lines:
        print(f"grades ttc: skipped {len(rep.bad_lines)} malformed line(s) of {rep.lines_read}:", file=sys.stderr)
        for ln, why in rep.bad_lines[:20]:
            print(f"  line {ln}: {why}", file=sys.stderr)
        if len(rep.bad_lines) > 20:
            print(f"  ... and {len(rep.bad_lines) - 20} more", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``grades ttc``; returns the exit code (0 choice found, 1 none meets target, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    target: float | str = args.target
    if target not in ("final", "projection"):
        try:
            target = float(target)
        except ValueError:
            print(f"grades ttc: error: --target must be a number, 'final' or 'projection', got {args.target!r}",
                  file=sys.stderr)
            return 2
    if args.plot:
        ext = os.path.splitext(args.plot)[1].lower().lstrip(".")
        try:
            from matplotlib.backend_bases import FigureCanvasBase
            kinds = FigureCanvasBase.get_supported_filetypes()
        except ImportError:
            print("grades ttc: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
        if ext not in kinds:
            print(f"grades ttc: error: --plot {args.plot!r}: unsupported file extension {ext or '(none)'!r}; "
                  f"use one of {', '.join('.' + k for k in sorted(kinds))}", file=sys.stderr)
            return 2
    rep = LoadReport()
    try:
        cks = load_samples(args.samples, on_bad_line=args.on_bad_line, report=rep)
    except FileNotFoundError:
        print(f"grades ttc: error: no such file: {args.samples}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"grades ttc: error: cannot read {args.samples}: {e.strerror or e}", file=sys.stderr)
        return 2
    except SamplesFormatError as e:
        _report_skipped(rep)
        print(f"grades ttc: error: {e}", file=sys.stderr)
        return 2
    _report_skipped(rep)
    infer_flops = args.infer_flops if args.infer_flops is not None else _infer_flops_from(args.samples)
    try:
        common, dropped = common_problems(cks)
        k_max = args.k_max if args.k_max is not None else min(c.min_samples for c in common)
        sel = select(common, k_max=k_max, target=target, tolerance=args.tolerance,
                     strategies=None if args.strategies is None else " ".join(args.strategies),
                     queries=args.queries,
                     infer_flops_per_sample=infer_flops, final_train_flops=args.final_flops)
        per = _per_strategy(common, sel, args, target, infer_flops)
    except (ValueError, TypeError) as e:
        print(f"grades ttc: error: {e}", file=sys.stderr)
        return 2
    if dropped:
        print(f"grades ttc: {dropped} problem(s) missing from some checkpoint were left out", file=sys.stderr)
    if args.strategies is None and "best-of-k" not in sel.strategies:
        unscored = next(c.name for c in common if c.scores() is None)
        print(f"grades ttc: note: best-of-k left out: checkpoint {unscored!r} has samples without a "
              "'score'", file=sys.stderr)
    out = sys.stdout
    print(f"{len(common)} checkpoints x {sel.n_problems} problems, k = 1..{sel.k_max}", file=out)
    if sel.projection is not None:
        pr = sel.projection
        print(f"projection ({pr.form} form): {pr.point:.4f}, {pr.confidence:.0%} bounds [{pr.lower:.4f}, "
              f"{pr.upper:.4f}]; held-out error by form: "
              + ", ".join(f"{f}={'n/a' if e is None else f'{e:.3g}'}" for f, e in pr.held_out_error.items()),
              file=out)
    print(f"target {sel.target:.4f} ({sel.target_source}), tolerance {sel.tolerance:g} -> "
          f"threshold {sel.threshold:.4f}", file=out)
    if infer_flops is not None and args.infer_flops is None:
        print(f"inference FLOPs per sample {infer_flops:.4g} (from the samples file)", file=out)
    print(file=out)
    if args.table:
        _print_table(sel, out)
        print(file=out)
    _print_choices(per, out)
    print(file=out)
    code = 0
    if sel.min_train is None:
        print("no (checkpoint, k, strategy) meets the target", file=out)
        code = 1
    else:
        _describe(sel.min_train, sel, "overall, fewest training FLOPs", out)
        if sel.min_total is not None:
            _describe(sel.min_total, sel, "overall, fewest total FLOPs", out)
    if "pass@k" in sel.strategies:
        print("note: pass@k assumes an oracle verifier picks a correct sample at deployment: an upper bound.",
              file=out)
    try:
        if args.json:
            d = sel.to_dict()
            d["skipped_lines"] = [{"line": ln, "reason": why} for ln, why in rep.bad_lines]
            d["k_fits"] = _k_fits(sel)
            try:
                text = json.dumps(d, indent=1, allow_nan=False)
            except ValueError as e:
                print(f"grades ttc: error: the result holds a non-finite number ({e}); JSON not written",
                      file=sys.stderr)
                return 2
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text)
            print(f"JSON written to {args.json}", file=out)
        if args.plot:
            from .plot import plot_selection
            plot_selection(sel, args.plot, choices={s: ps.min_train for s, ps in per.items()})
            print(f"plot written to {args.plot}", file=out)
    except OSError as e:
        print(f"grades ttc: error: cannot write {e.filename or 'output'}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:  # matplotlib refusing the plot
        print(f"grades ttc: error: cannot write the plot {args.plot}: {e}", file=sys.stderr)
        return 2
    return code
