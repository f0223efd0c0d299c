"""Mutation testing (mutmut 3) of the rooms that learn and serve: training/, adapters/,
runtime/ and task/.

Usage: python benchmarks/mutation.py [--mutate PATH ...] [--tests TEST_FILE ...]
                                     [--max-children 2] [--summary-only]
       (``make mutation MUTATE="src/inca/training/selection.py src/inca/task/schema.py"``)

mutmut copies the package to ``mutants/`` (git-ignored), mutates every function of the four
rooms (``[tool.mutmut]`` in pyproject.toml), records once which of the selected tests reach
which function, then runs each mutant of the ``--mutate`` files or folders against the tests
that reached its function. The whole scope takes hours on two cores, so ``--mutate`` runs
part of it; results pile up in ``mutants/`` across runs, and the summary covers every module
with checked mutants.

Writes ``benchmarks/results/mutation.{json,md}``: killed / survived / timeout / no tests per
module, the score (detected / all: killed, timed out and crashed mutants are detected;
survivors and mutants no selected test reaches are not), the same score without the
mutants explained below as equivalent, each survivor's diff with its explanation, and the
modules not run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("training", "adapters", "runtime", "task")
DETECTED = ("killed", "timeout", "segfault", "caught by type check")
UNDETECTED = ("survived", "no tests", "suspicious")
# mutmut 3's exit codes (mutmut.stats.status_by_exit_code), kept here so the summary reads
# the meta files without importing mutmut
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
          34: "skipped", 35: "suspicious", 36: "timeout", 37: "caught by type check",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault",
          -9: "segfault", 2: "interrupted"}

# How each survivor was triaged, by mutant name (names follow the source: editing a function
# may renumber its mutants): one line per mutant in TRIAGE, ``name<TAB>verdict<TAB>why``.
# "killed": a test added after a run fails on it (checked against that mutant alone; the
# next run counts it as killed); "equivalent": it behaves as the original (left out of the
# adjusted score); "accepted": a real difference these tests cannot see (on one CPU
# process), counted as a survivor; "removed": the code it mutated is gone.
TRIAGE = ROOT / "benchmarks" / "mutation_triage.tsv"
RETRIAGED = ("The survivors' verdicts were read again from the triage file after the run "
             "(`python benchmarks/mutation.py --retriage`): no mutant was run again.")
VERDICTS = ("killed", "equivalent", "accepted", "removed")


def read_triage(path: Path = TRIAGE) -> dict[str, tuple[str, str]]:
    """``{mutant name: (verdict, why)}`` from the triage file (``#`` lines are comments)."""
    out: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, verdict, why = line.split("\t")
        if verdict not in VERDICTS or name in out:
            raise SystemExit(f"{path.name}:{n}: a verdict of {VERDICTS}, once per mutant")
        out[name] = (verdict, why)
    return out


def mutant_glob(path: str) -> str:
    """mutmut's name pattern for a source file or folder: src/inca/task/schema.py ->
    inca.task.schema.*"""
    p = Path(path)
    parts = list(p.with_suffix("").parts if p.suffix == ".py" else p.parts)
    if parts and parts[0] == "src":
        parts = parts[1:]
    if parts and parts[-1] == "__init__":  # a package's own functions: inca.task.x_...
        return ".".join(parts[:-1]) + ".x*"
    if not (len(parts) >= 2 and parts[0] == "inca" and parts[1] in ROOMS):
        raise SystemExit(f"{path}: not under src/inca/{{{','.join(ROOMS)}}}")
    return ".".join(parts) + ".*"


def run_mutmut(globs: list[str], tests: list[str], max_children: int,
               sample: int = 0, seed: int = 0) -> None:
    """In this process: mutmut's ``run`` with the test selection replaced by ``tests``; with
    ``sample``, only that many of the matched mutants, drawn uniformly (seeded) from all."""
    os.chdir(ROOT)
    from mutmut import configuration

    cfg = configuration.config()
    if tests:
        cfg.pytest_add_cli_args_test_selection = list(tests)
    import mutmut.__main__ as mm

    if sample:
        collect = mm.collect_source_file_mutation_data

        def sampled(*, mutant_names):  # mutmut's own list of matched mutants, thinned
            mutants, by_path = collect(mutant_names=mutant_names)
            keep = sorted(random.Random(seed).sample(range(len(mutants)),
                                                     min(sample, len(mutants))))
            print(f"    sampled {len(keep)} of {len(mutants)} mutants (seed {seed})")
            return [mutants[i] for i in keep], by_path

        mm.collect_source_file_mutation_data = sampled
    mm._run(globs, max_children)


def read_results() -> dict[str, dict[str, str]]:
    """``{source path: {mutant name: status}}`` from mutmut's meta files."""
    out = {}
    for room in ROOMS:
        for meta in sorted((ROOT / "mutants" / "src" / "inca" / room).rglob("*.py.meta")):
            source = meta.relative_to(ROOT / "mutants").as_posix()[: -len(".meta")]
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            out[source] = {k: "not checked" if v is None else STATUS.get(v, "suspicious")
                           for k, v in codes.items()}
    return out


def diff_of(name: str, source: str) -> str:
    os.chdir(ROOT)
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        lines = get_diff_for_mutant(name, path=source).splitlines()
        return "\n".join(line for line in lines if line.startswith(("+", "-"))
                         and not line.startswith(("+++", "---")))
    except Exception as e:  # the summary still lists the mutant
        return f"(no diff: {e})"


def score(counts: Counter) -> float | None:
    detected = sum(counts[s] for s in DETECTED)
    total = detected + sum(counts[s] for s in UNDETECTED)
    return detected / total if total else None


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def summarize(tests: list[str], notes: list[str], sample: int = 0, seed: int = 0) -> None:
    from _common import publish

    results, triage = read_results(), read_triage()
    if not results:
        raise SystemExit("no mutmut results in mutants/: run without --summary-only first")
    fields = summary(results, triage, tests, notes, sample, seed)
    publish("mutation", fields, to_markdown(fields))


def tally(results: dict[str, dict[str, str]], triage: dict[str, tuple[str, str]]
          ) -> tuple[list[dict], list[dict], list[dict], Counter]:
    """``(modules run, modules not run, survivors, status totals)``: each survivor with its
    triage and its diff."""
    modules, not_run, survivors, total = [], [], [], Counter()
    for source, statuses in results.items():
        counts = Counter(statuses.values())
        checked = sum(n for s, n in counts.items() if s != "not checked")
        if not checked:
            not_run.append({"module": source, "mutants": len(statuses)})
            continue
        total += counts
        modules.append({"module": source, "mutants": len(statuses), **dict(counts),
                        "score": score(counts)})
        for name, status in sorted(statuses.items()):
            if status in UNDETECTED:
                kind, why = triage.get(name, ("unexplained", ""))
                survivors.append({"mutant": name, "module": source, "status": status,
                                  "explained": kind, "why": why,
                                  "diff": diff_of(name, source)})
    return modules, not_run, survivors, total


def triaged_scores(total: Counter, survivors: list[dict]) -> dict:
    """The fields that follow from the survivors' triage: the score without the equivalent
    mutants, and with the survivors killed since by new tests counted as killed."""
    equivalent = Counter(s["status"] for s in survivors if s["explained"] == "equivalent")
    killed_after = sum(1 for sv in survivors if sv["explained"] == "killed")
    after = total - equivalent
    after["killed"] += killed_after
    after["survived"] -= killed_after
    return {"score_excluding_equivalent": score(total - equivalent),
            "killed_since_by_new_tests": killed_after,
            "score_with_new_tests_excluding_equivalent": score(after),
            "equivalent": sum(equivalent.values()),
            "unexplained_survivors": sum(1 for s in survivors
                                         if s["explained"] == "unexplained")}


def retriage(payload: dict, triage: dict[str, tuple[str, str]]) -> dict:
    """A results payload with each survivor's verdict read again from ``triage`` and the
    scores that follow from them (the mutants are not run again)."""
    survivors = [{**s, "explained": triage.get(s["mutant"], ("unexplained", ""))[0],
                  "why": triage.get(s["mutant"], ("unexplained", ""))[1]}
                 for s in payload["survivors"]]
    notes = [n for n in payload["notes"] if not n.startswith(RETRIAGED)]
    return {**payload, "survivors": survivors, "notes": [*notes, RETRIAGED],
            **triaged_scores(Counter(payload["totals"]), survivors)}


def summary(results: dict[str, dict[str, str]], triage: dict[str, tuple[str, str]],
            tests: list[str], notes: list[str], sample: int, seed: int) -> dict:
    """mutation.json's fields: the scores (raw, without the equivalent mutants, with the
    survivors killed since), the totals, each module and each survivor."""
    from inca.task.report_render import wilson_interval

    modules, not_run, survivors, total = tally(results, triage)
    n_run = sum(total[s] for s in DETECTED + UNDETECTED)
    population = sum(len(v) for v in results.values())
    low, high = wilson_interval(sum(total[s] for s in DETECTED) / max(n_run, 1), n_run)
    return {
        "sample": {"mutants": n_run, "population": population, "seed": seed,
                   "interval_95": [low, high]} if sample else None,
        "scope": "src/inca/{training,adapters,runtime,task}",
        "tests": tests,
        "score": score(total), **triaged_scores(total, survivors), "totals": dict(total),
        "modules": modules, "not_run": not_run, "survivors": survivors, "notes": notes,
    }


def to_markdown(f: dict) -> list[str]:
    """mutation.md's lines from :func:`summary`'s fields."""
    return _scores_md(f) + _survivors_md(f["survivors"]) + _not_run_md(f) + [
        "", "Tests selected: " + ", ".join(f"`{t}`" for t in f["tests"]) + ".",
        *[f"\n{n}" for n in f["notes"]]]


def _scores_md(f: dict) -> list[str]:
    """The title, the scores, and a row per module."""
    sample, totals, modules = f["sample"], f["totals"], f["modules"]
    n_run = sum(totals.get(s, 0) for s in DETECTED + UNDETECTED)
    sampling = (f"a uniform random sample of {n_run} of the scope's {sample['population']} "
                f"mutants (seed {sample['seed']}): the score estimates the whole scope's, 95% "
                f"Wilson interval {pct(sample['interval_95'][0])} to "
                f"{pct(sample['interval_95'][1])}" if sample else "")
    md = ["# Mutation testing: training/, adapters/, runtime/, task/", "",
          "mutmut 3 (`make mutation`, `benchmarks/mutation.py`): every function of the four "
          "rooms mutated; each mutant run against the selected tests that reach its function. "
          "Score = detected / (detected + undetected); detected = killed, timed out or "
          "crashed; undetected = survived or reached by no selected test.", "",
          f"**Score: {pct(f['score'])}** over {len(modules)} module(s) "
          f"({n_run} mutants{'; ' + sampling if sampling else ''}); "
          f"{pct(f['score_excluding_equivalent'])} without the {f['equivalent']} equivalent "
          f"mutant(s) explained below; {f['killed_since_by_new_tests']} survivor(s) killed "
          "since by new tests (each checked against its mutant), making "
          f"{pct(f['score_with_new_tests_excluding_equivalent'])} without the equivalent "
          f"ones; {f['unexplained_survivors']} survivor(s) not yet triaged.", "",
          "| module | mutants | killed | timeout | survived | no tests | not run | score |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in modules:
        md.append(f"| `{m['module']}` | {m['mutants']} | {m.get('killed', 0)} | "
                  f"{m.get('timeout', 0)} | {m.get('survived', 0)} | "
                  f"{m.get('no tests', 0)} | {m.get('not checked', 0)} | {pct(m['score'])} |")
    return md


def _survivors_md(survivors: list[dict]) -> list[str]:
    """Each survivor: its status, its triage, its diff."""
    md = ["", "## Survivors", ""]
    if not survivors:
        md.append("None.")
    for s in survivors:
        md += [f"- `{s['mutant']}` ({s['status']}, {s['explained']})"
               + (f": {s['why']}" if s["why"] else ""), "", "  ```diff",
               *[f"  {line}" for line in s["diff"].splitlines()], "  ```", ""]
    return md


def _not_run_md(f: dict) -> list[str]:
    """What was not run: the rest of a sample, or the modules not run."""
    sample, not_run = f["sample"], f["not_run"]
    md = ["## Not run", ""]
    if sample:
        md.append(f"The other {sample['population'] - sample['mutants']} mutants were not run "
                  "(a sample)"
                  + ("; modules none of whose mutants was drawn: "
                     + ", ".join(f"`{m['module']}`" for m in not_run) if not_run else "")
                  + ".")
    elif not_run:
        md.append("Mutated but not run (time: the whole scope takes hours on this machine's "
                  "two cores; `make mutation MUTATE=<file>` runs one):")
        md += [f"- `{m['module']}` ({m['mutants']} mutants)" for m in not_run]
    else:
        md.append("Every module of the four rooms was run.")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutate", nargs="+", default=[f"src/inca/{r}" for r in ROOMS],
                    help="source files or folders of the four rooms to run")
    ap.add_argument("--tests", nargs="*", default=[],
                    help="test files to select (default: pyproject's [tool.mutmut] ones)")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--summary-only", action="store_true",
                    help="only write the results from what mutants/ holds")
    ap.add_argument("--sample", type=int, default=0,
                    help="run only this many of the matched mutants, drawn uniformly at random")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed")
    ap.add_argument("--note", action="append", default=[],
                    help="a line for the results (how a run was made)")
    ap.add_argument("--retriage", action="store_true",
                    help="re-read the triage file into the committed results: each "
                         "survivor's verdict and the scores that follow (no mutant run)")
    ap.add_argument("--run-mutmut", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.retriage:
        from _common import RESULTS, write_results

        payload = retriage(json.loads((RESULTS / "mutation.json").read_text()), read_triage())
        write_results("mutation", payload, "\n".join(to_markdown(payload)) + "\n", RESULTS)
        return
    globs = [mutant_glob(p) for p in args.mutate]
    if args.run_mutmut:  # the child: nothing of inca imported before mutmut sets sys.path
        run_mutmut(globs, args.tests, args.max_children, args.sample, args.seed)
        return
    if not args.summary_only:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per mutant's tests
        cmd = [sys.executable, __file__, "--run-mutmut", "--max-children",
               str(args.max_children), "--sample", str(args.sample), "--seed", str(args.seed),
               "--mutate", *args.mutate]
        if args.tests:
            cmd += ["--tests", *args.tests]
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc:
            raise SystemExit(f"mutmut stopped (exit status {rc})")
    tests = args.tests
    if not tests:
        import tomllib

        conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
        tests = conf["pytest_add_cli_args_test_selection"]
    summarize(tests, args.note, args.sample, args.seed)


if __name__ == "__main__":
    main()
