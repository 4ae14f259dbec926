"""How often ``tppo.rewards.math_reward`` agrees with the verdicts of math-verify's own test suites.

The issue asks for >= 99 % agreement with the (gold, pred, expected) cases of math-verify's
tests/test_all.py, tests/test_open_thoughts.py and tests/test_numina_cases.py. None of those
cases is copied here: the script imports the three modules from a math-verify checkout at run
time and reads each test function's ``pytest.mark.parametrize`` table and, from its source,
how it calls math-verify. A function counts only when its one call into math-verify is the
suite's helper ``compare_strings(gold, pred, ...)`` (gold and pred in that order, not swapped)
and its cases are (gold, pred, expected, ...); a case counts
only when its settings are default-ish: latex and/or expr extraction, ``precision`` 5 or 6
(the default), ``strict`` on, ``allow_set_relation_comp`` off. Everything left out is printed
with the reason. Some kept tests extract with latex or expr alone where math_reward uses both;
a case whose verdict those narrower targets decide (math-verify with both targets gives the
other one) is counted, and its agreement is also shown without such cases.

Each case is scored as ``math_reward("", pred, gold)`` by a ``RewardScorer`` (worker
processes, 5 s per call: some inputs make sympy hang), and also by the installed math-verify
with the case's own settings and with both targets, so a disagreement can be told apart from
a case that math-verify itself no longer passes (the installed version may be newer than the
checkout) or one that the narrower targets decide.

    mkdir -p /tmp/mv && git -C MIRROR archive HEAD tests | tar -x -C /tmp/mv
    python benchmarks/math_reward_agreement.py --math-verify-dir /tmp/mv --math-verify-commit SHA
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402

from tppo.rewards import RewardScorer, math_reward  # noqa: E402

SUITES = ("test_all", "test_open_thoughts", "test_numina_cases")
DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True, "allow_set_relation_comp": False}
TIMEOUT_S = 5.0


# ---------------------------------------------------------------------- reading the suites


def load_suite(mv_dir: Path, name: str):
    """Import ``tests.<name>`` from the checkout (its modules import ``tests.test_all``)."""
    if str(mv_dir) not in sys.path:
        sys.path.insert(0, str(mv_dir))
    return importlib.import_module(f"tests.{name}")


def calls_in(fn) -> list[ast.Call]:
    """The calls in ``fn``'s body (its decorators left out)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body
    return [n for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Call)]


def called_names(fn) -> list[str]:
    """What ``fn`` calls, for the reason it is left out."""
    return sorted({ast.unparse(c.func) for c in calls_in(fn)} - {"pytest.approx"})


def compare_call(fn) -> ast.Call | str:
    """The single ``compare_strings(gold, pred, ...)`` call in ``fn``'s body, or why there is none."""
    compares = [c for c in calls_in(fn) if isinstance(c.func, ast.Name) and c.func.id == "compare_strings"]
    if len(compares) != 1:
        return f"not one compare_strings(gold, pred) verdict (calls {', '.join(called_names(fn))})"
    args = [ast.unparse(a) for a in compares[0].args]
    if args != ["gold", "pred"]:
        return f"calls compare_strings({', '.join(args)}): not (gold, pred) in that order"
    return compares[0]


def cases_of(fn) -> list[dict]:
    """The parametrize rows of ``fn`` as dicts of its argument names (a row of the wrong
    length, which pytest itself would reject, is skipped)."""
    rows = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = mark.args[0] if isinstance(mark.args[0], (list, tuple)) else [n.strip() for n in mark.args[0].split(",")]
        for row in mark.args[1]:
            values = getattr(row, "values", row)  # pytest.param or a plain tuple
            if len(values) == len(names):
                rows.append(dict(zip(names, values)))
    return rows


def case_settings(call: ast.Call, case: dict) -> dict:
    """compare_strings' keyword settings for one case: literals, or the case's own parameters."""
    settings = dict(DEFAULTS)
    for kw in call.keywords:
        if isinstance(kw.value, ast.Name) and kw.value.id in case:
            settings[kw.arg] = case[kw.value.id]
        else:
            settings[kw.arg] = ast.literal_eval(kw.value)
    return settings


def off_default(settings: dict) -> str | None:
    """Why a case's settings decide its verdict (so it is left out), or None if default-ish.

    ``precision`` 5 instead of 6 keeps the cases that use it (sqrt(17) against its 15-digit
    value, 4 against 4*sqrt(2), \\text{13} against 13) about the answer, not the rounding.
    """
    if not set(settings["match_types"]) <= {"latex", "expr"}:
        return f"match_types={settings['match_types']}: an extraction target math_reward does not use"
    if settings["precision"] < 5:
        return f"precision={settings['precision']}: a rounding test (math_reward verifies at 6 digits)"
    if settings["allow_set_relation_comp"]:
        return "allow_set_relation_comp=True: an opt-in verify option math_reward leaves off"
    if not settings["strict"]:
        return "strict=False: an opt-in verify option math_reward leaves on"
    return None


def collect(mv_dir: Path) -> tuple[list[dict], list[dict]]:
    """(kept cases, left-out functions and case groups with reasons) of the three suites."""
    kept, excluded = [], []
    for suite in SUITES:
        module = load_suite(mv_dir, suite)
        for name, fn in vars(module).items():
            if not name.startswith("test_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            test, cases = f"{suite}.py::{name}", cases_of(fn)
            call = compare_call(fn) if cases else f"no parametrized cases (calls {', '.join(called_names(fn))})"
            if cases and not {"gold", "pred", "expected"} <= set(cases[0]):
                call = f"parameters {', '.join(cases[0])}: not (gold, pred, expected)"
            if isinstance(call, str):
                excluded.append({"test": test, "cases": len(cases), "reason": call})
                continue
            reasons: dict[str, int] = {}
            for case in cases:
                settings = case_settings(call, case)
                reason = off_default(settings)
                if reason:
                    reasons[reason] = reasons.get(reason, 0) + 1
                else:
                    kept.append({"suite": suite, "test": test, "gold": case["gold"], "pred": case["pred"],
                                 "expected": int(case["expected"]), "settings": settings})
            excluded += [{"test": test, "cases": n, "reason": r} for r, n in reasons.items()]
    return kept, excluded


# ---------------------------------------------------------------------- scoring


def math_verify_verdict(settings_json: str, pred: str, gold: str) -> float:
    """math-verify's own verdict under a case's settings (a reward function for the scorer:
    the settings ride in the prompt argument). Timeouts are the scorer's, as in math_reward."""
    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the scorer's is on
    s = json.loads(settings_json)
    configs = {"latex": LatexExtractionConfig(boxed_match_priority=0), "expr": ExprExtractionConfig()}
    targets = [configs[t] for t in s["match_types"]]
    return float(verify(parse(gold, targets, parsing_timeout=None), parse(pred, targets, parsing_timeout=None),
                        float_rounding=s["precision"], strict=s["strict"],
                        allow_set_relation_comp=s["allow_set_relation_comp"], timeout_seconds=None))


def score_all(fn, prompts: list[str], preds: list[str], golds: list[str], workers: int) -> tuple[list[float], list[bool]]:
    """Rewards and timed-out flags, one call per batch: the scorer counts timeouts per batch,
    and a hang that forces a pool restart then costs only its own case."""
    rewards, timed_out = [], []
    with RewardScorer(fn, timeout_s=TIMEOUT_S, workers=workers) as scorer:
        for prompt, pred, gold in zip(prompts, preds, golds):
            before = scorer.timeouts
            rewards += scorer.score([prompt], [pred], [gold])
            timed_out.append(scorer.timeouts > before)
    return rewards, timed_out


# ---------------------------------------------------------------------- report


def tally(cases: list[dict], key: str) -> dict:
    """Per value of ``key``: cases, agreements of ours with expected and %, math-verify's own
    agreements, and the same % without the cases that the test's extraction targets decide."""
    groups: dict[str, dict] = {}
    for c in cases:
        g = groups.setdefault(c[key], {"cases": 0, "agree": 0, "math_verify_agrees": 0, "targets_decide": 0,
                                       "agree_targets_not_deciding": 0})
        g["cases"] += 1
        g["agree"] += c["ours"] == c["expected"]
        g["math_verify_agrees"] += c["math_verify"] == c["expected"]
        g["targets_decide"] += c["targets_decide"]
        g["agree_targets_not_deciding"] += c["ours"] == c["expected"] and not c["targets_decide"]
    for g in groups.values():
        g["agreement_pct"] = round(100 * g["agree"] / g["cases"], 2)
        rest = g["cases"] - g["targets_decide"]
        g["agreement_pct_targets_not_deciding"] = round(100 * g["agree_targets_not_deciding"] / rest, 2) if rest else None
    return groups


def math_verify_commit(mv_dir: Path, given: str | None) -> str:
    """HEAD of ``mv_dir`` when it is itself a git work tree's top level, else ``given``."""
    try:
        top = subprocess.run(["git", "-C", str(mv_dir), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        if Path(top.stdout.strip()).resolve() == mv_dir.resolve():
            return subprocess.run(["git", "-C", str(mv_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return given or "unknown"


def print_report(summary: dict) -> None:
    """The tables, the left-out tests and the disagreements. Columns: mv = math-verify's own
    agreements under the test's settings; td = cases its extraction targets decide (default
    targets give the other verdict); %td = our agreement without those."""
    print(f"{'':55s} {'cases':>5s} {'agree':>5s} {'%':>7s} {'mv':>5s} {'td':>3s} {'%td':>7s}")
    rows = [*summary["per_file"].items(), ("total", summary["total"]), *summary["per_function"].items()]
    for name, g in rows:
        pct_td = g["agreement_pct_targets_not_deciding"]
        print(f"{name:55s} {g['cases']:5d} {g['agree']:5d} {g['agreement_pct']:7.2f} {g['math_verify_agrees']:5d}"
              f" {g['targets_decide']:3d} {pct_td if pct_td is not None else float('nan'):7.2f}")
    print("\nleft out:")
    for e in summary["excluded"]:
        print(f"  {e['test']} ({e['cases']} cases): {e['reason']}")
    print(f"\ndisagreements ({len(summary['disagreements'])}):")
    for d in summary["disagreements"]:
        notes = (" (timeout)" if d["timeout"] else "") + (f" (targets {d['settings']['match_types']} decide)" if d["targets_decide"] else "")
        print(f"  {d['test']}  expected={d['expected']} ours={d['ours']} math_verify={d['math_verify']}"
              f" with_default_targets={d['math_verify_default_targets']}{notes}\n    gold: {d['gold']!r}\n    pred: {d['pred']!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--math-verify-dir", type=Path, required=True, help="a directory holding math-verify's tests/")
    ap.add_argument("--math-verify-commit", help="the checkout's commit, when the directory is not a git work tree")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "math_reward_agreement.json")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    cases, excluded = collect(args.math_verify_dir.resolve())
    golds, preds = [c["gold"] for c in cases], [c["pred"] for c in cases]
    ours, ours_timeout = score_all(math_reward, [""] * len(cases), preds, golds, args.workers)
    theirs, _ = score_all(math_verify_verdict, [json.dumps(c["settings"]) for c in cases], preds, golds, args.workers)
    default_targets = [json.dumps({**c["settings"], "match_types": DEFAULTS["match_types"]}) for c in cases]
    theirs_default, _ = score_all(math_verify_verdict, default_targets, preds, golds, args.workers)
    for c, o, t, m, d in zip(cases, ours, ours_timeout, theirs, theirs_default):
        c.update(ours=int(o), timeout=t, math_verify=int(m), math_verify_default_targets=int(d),
                 targets_decide=m == c["expected"] != d)
    total = tally([{**c, "all": "total"} for c in cases], "all")["total"]
    summary = {
        "math_verify_commit": math_verify_commit(args.math_verify_dir, args.math_verify_commit),
        "math_verify_installed": version("math-verify"),
        "tppo_commit": commit(),
        "machine": machine(),
        "timeout_s": TIMEOUT_S,
        "per_file": tally(cases, "suite"),
        "per_function": tally(cases, "test"),
        "total": total,
        "excluded": excluded,
        "disagreements": [{k: c[k] for k in ("test", "gold", "pred", "expected", "ours", "math_verify",
                                             "math_verify_default_targets", "targets_decide", "timeout", "settings")}
                          for c in cases if c["ours"] != c["expected"]],
    }
    print_report(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
