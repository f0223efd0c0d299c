"""The faults benchmark's results (``benchmarks/faults.py``): the payload of faults.json
from what the parts found, and faults.md from it, one function a section."""

from __future__ import annotations

import argparse
from typing import Any

from _common import command_line, environment
from _faults_bench import short, source_info
from _faults_cases import HANDLED, SILENT


def summarize(kills: list[dict[str, Any]], cases: list[dict[str, Any]],
              load: dict[str, Any] | None, fit_clean: dict[str, Any],
              args: argparse.Namespace, seconds: dict[str, float], backbone: str
              ) -> dict[str, Any]:
    counted = [c for c in cases if c["outcome"] != "harness error"]
    phases = (load or {}).get("phases", {})
    alone, bombs = phases.get("alone", {}), phases.get("bombs", {})
    p99a = alone.get("latency_ms", {}).get("p99")
    p99b = bombs.get("latency_ms", {}).get("p99")
    return {
        "faults_injected": len(kills),
        "faults_survived": sum(k["survived"] for k in kills),
        "bad_inputs_tried": len(counted),
        "bad_inputs_handled_clearly": sum(c["outcome"] == HANDLED for c in counted),
        "silent_wrong_results": sum(k["silent_wrong"] for k in kills)
        + sum(c["outcome"] == SILENT for c in counted),
        "data_lost_events": sum(k["data_lost"] for k in kills)
        + sum(bool(c["data_lost"]) for c in counted),
        "load": {
            "requests": alone.get("requests", 0) + bombs.get("requests", 0),
            "errors": alone.get("errors", 0) + bombs.get("errors", 0),
            "wrong_answers": alone.get("wrong_answers", 0) + bombs.get("wrong_answers", 0),
            "p99_ms_normal": p99a,
            "p99_ms_normal_under_bombs": p99b,
        },
        "benchmark": "faults", "command": command_line(), "environment": environment(),
        "runtime_s": round(seconds["total"], 1),
        "part_seconds": {k: round(v, 1) for k, v in seconds.items() if k != "total"},
        "backbone": backbone, "inca_source": source_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "p99_under_bombs_over_alone": p99b / p99a if p99a and p99b else None,
        "kills": kills, "fit_clean_run": fit_clean, "bad_inputs": cases,
        "harness_errors": [c for c in cases if c["outcome"] == "harness error"],
        "load_detail": load,
    }


def to_markdown(p: dict[str, Any]) -> str:
    md = _head_md(p)
    if p["kills"]:
        md += _kills_md(p["kills"])
    if p["bad_inputs"]:
        md += _bad_inputs_md(p["bad_inputs"])
    if p.get("load_detail"):
        md += _load_md(p)
    return "\n".join(md)


def _cell(text: Any, n: int = 160) -> str:
    return short(str(text), n).replace("|", "\\|")


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _head_md(p: dict[str, Any]) -> list[str]:
    """The title, the run's setting and the table of measures."""
    env, load = p["environment"], p["load"]
    return [
        "# Faults: repeated kill -9, bad inputs, `inca serve` under decompression bombs",
        "",
        f"Command: `{p['command']}`  ",
        f"{env['device']}, torch {env['torch']}, {env['cpu_threads']} thread(s) per process; "
        f"backbone {p['backbone']}; runtime {p['runtime_s']:.0f} s; inca at commit "
        f"{p['inca_source']['commit']}"
        + (" with uncommitted changes" if p["inca_source"]["uncommitted_changes_in_src"]
           else "") + ".  ",
        "Seconds per part: " + ", ".join(f"{k} {v:.1f}" for k, v in p["part_seconds"].items())
        + " (the machine's 2 cores were shared with other work).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| faults injected (SIGKILL) | {p['faults_injected']} |",
        f"| faults survived | {p['faults_survived']} |",
        f"| bad inputs tried | {p['bad_inputs_tried']} |",
        f"| bad inputs handled clearly | {p['bad_inputs_handled_clearly']} |",
        f"| silent wrong results | {p['silent_wrong_results']} |",
        f"| data-lost events | {p['data_lost_events']} |",
        f"| load: normal requests / errors / wrong answers | {load['requests']} / "
        f"{load['errors']} / {load['wrong_answers']} |",
        f"| load: p99 ms alone / under bombs | {_ms(load['p99_ms_normal'])} / "
        f"{_ms(load['p99_ms_normal_under_bombs'])} |",
        "",
    ]


def _kills_md(kills: list[dict[str, Any]]) -> list[str]:
    """Kills: a row per kind, what survived means, and each kill not survived."""
    md = ["## Kills", "",
          "| kind | injected | survived | data lost | silent wrong | states hit at the "
          "kill |", "|---|---:|---:|---:|---:|---|"]
    for kind in dict.fromkeys(k["kind"] for k in kills):
        rows = [k for k in kills if k["kind"] == kind]
        states = sorted({str(r.get("state_at_kill") or r.get("loaded_as")) for r in rows})
        md.append(f"| {kind} | {len(rows)} | {sum(r['survived'] for r in rows)} | "
                  f"{sum(r['data_lost'] for r in rows)} | "
                  f"{sum(r['silent_wrong'] for r in rows)} | {_cell('; '.join(states), 300)} |")
    md += ["", "Survived: `extract_to_cache` resumed in-process to a cache equal to an "
           "uninterrupted one, with no recorded shard extracted again; `Task.save` left "
           "the last finished save or the one in progress, and the next save left nothing "
           "behind; `inca fit` run again exited 0, kept every recorded shard file, and gave "
           "the clean run's cache and task weights (a run killed after its report was "
           "written may instead be refused clearly, as a finished run, and is then fitted "
           "again with `--overwrite`). Data lost: a resume that failed or wrote a recorded "
           "shard again. Each kill's details are in faults.json (`kills`).", ""]
    not_survived = [k for k in kills if not k["survived"]]
    if not_survived:
        why = [k.get("rerun_error") or k.get("resume_error") or k.get("loaded_as")
               for k in not_survived]
        md += ["Not survived:", ""] + [
            f"- {k['kind']}, killed at {k.get('killed_at') or k.get('kill_after_s')} "
            f"({k.get('state_at_kill')}): {_cell(w, 300)}"
            for k, w in zip(not_survived, why, strict=True)] + [""]
    return md


def _bad_inputs_md(cases: list[dict[str, Any]]) -> list[str]:
    """Bad inputs: what handled clearly means, a row per case, a reproduction of each
    case not handled clearly."""
    md = ["## Bad inputs", "",
          "Handled clearly: a 4xx with a JSON `detail`; exit code 2 with one `error: ...` "
          "line on stderr and no traceback (`inca predict`, which reads on past an "
          "unreadable image: exit 1, one `error:` line naming it, the good image "
          "predicted); or the correct result where one is expected. "
          "Silent wrong: a bad input accepted, or a valid one answered wrongly. CLI cases "
          "run in their own process (`own`: kills, patched disks, second writers, data "
          "workers, serve) or through typer's runner in this process (`shared`: the same "
          "command and error handling, without 2-4 s of interpreter start-up each). "
          "An input starting H1 ... L10 is a case of the outside attack (its report's "
          "numbering; benchmarks/_faults_attack.py); its HTTP cases run against a server "
          "of default limits (10 MB bodies), the others against a 2 MiB one.", "",
          "| id | area | input | expected | outcome | what happened |",
          "|---|---|---|---|---|---|"]
    for c in cases:
        mark = c["outcome"] if c["outcome"] == HANDLED else f"**{c['outcome']}**"
        area = f"{c['area']} ({c['process']})" if c["process"] else c["area"]
        md.append(f"| {c['id']} | {area} | {_cell(c['input'], 120)} | {c['expect']} | "
                  f"{mark} | {_cell(c['detail'])} |")
    bad = [c for c in cases if c["outcome"] != HANDLED]
    if bad:
        md += ["", "Not handled clearly, with a reproduction (`$TMP` is the script's "
               "temporary folder; see the case's input for how the file was made):", ""]
        md += [f"- `{c['id']}`: {_cell(c['detail'], 400)}  \n  `{c['reproduce']}`"
               for c in bad]
    md.append("")
    return md


def _load_md(p: dict[str, Any]) -> list[str]:
    """Load with bombs: the setting, a row per phase, the p99 ratio, CPU and memory."""
    detail, settings = p["load_detail"], p["settings"]
    md = ["## Load with bombs", "",
          f"`inca serve` (batching on, max batch 32, wait 5 ms, API key), one 8x8 PNG per "
          f"request from {settings['clients']} client threads; bombs: "
          f"{detail['bomb']} from {settings['bomb_clients']} threads of another "
          f"process, without pause; {settings['rounds']} alternating rounds of "
          f"{settings['requests'] // settings['rounds']} requests. Server, "
          "clients and bombers share the machine's 2 cores; every answer is checked "
          "against in-process `Task.predict_proba` (probabilities within 1e-4).", "",
          "| phase | requests | errors | wrong | p50 ms | p90 ms | p99 ms | max ms | "
          "bomb requests (status) | bomb p50 ms |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, ph in detail["phases"].items():
        lat = ph["latency_ms"]
        status = ", ".join(f"{k}: {v}" for k, v in sorted(ph["bomb_status"].items()))
        md.append(f"| {name} | {ph['requests']} | {ph['errors']} | {ph['wrong_answers']} | "
                  f"{_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | "
                  f"{_ms(lat['max'])} | {ph['bomb_requests']} ({status or '-'}) | "
                  f"{_ms(ph['bomb_latency_ms']['p50'])} |")
    ratio = p["p99_under_bombs_over_alone"]
    alone, bombs = detail["phases"]["alone"], detail["phases"]["bombs"]
    per_bomb = ((bombs["server_cpu_s"] - alone["server_cpu_s"]) / bombs["bomb_requests"]
                * 1000 if bombs["bomb_requests"] else None)
    md += ["", f"- p99 under bombs / alone: **{ratio:.2f}** (target: at most 2)"
           if ratio else "- p99 ratio: n/a",
           f"- server CPU: {alone['server_cpu_s']:.1f} s in {alone['wall_s']:.1f} s alone, "
           f"{bombs['server_cpu_s']:.1f} s in {bombs['wall_s']:.1f} s under bombs: about "
           f"{_ms(per_bomb)} ms per rejected bomb request (parsing the body, reading the "
           "headers); the bombs cost CPU time, not memory",
           f"- server peak RSS: {_ms(detail['server_peak_rss_mib_before'])} MiB before the "
           f"load, {_ms(detail['server_peak_rss_mib_after'])} MiB after (a decoded bomb "
           "would add 430 MiB)", ""]
    return md
