"""The GPU check: run the GPU lane (``tests/test_cuda.py``) with one command and write its report.

::

    python -m lightning_scale.gpu_check [--out DIR] [--timeout 480] [--world N]

It runs ``pytest -m cuda tests/test_cuda.py`` in a subprocess (JUnit XML for the results, no cache
directory, a hard timeout), then prints and writes ``DIR/gpu_check.md`` and ``DIR/gpu_check.json``:
the devices, the torch / CUDA / cuDNN / NCCL / driver / Lightning versions, and for every check its
result (passed, failed, skipped with the reason, or not run when the timeout struck), its duration
and the figures the test recorded. It installs nothing and needs no network. Without a CUDA device
every check is skipped and the report says so plainly ("no CUDA device: every check skipped").

Files in ``DIR`` (default ``./gpu_check``): ``gpu_check.md``, ``gpu_check.json``, ``junit.xml``,
``figures.jsonl`` (one line per figure record of a test), ``progress.jsonl`` (collected tests and
each result as it happens: what is left when the timeout strikes) and ``pytest.log``.

The 8-GPU release check is the same lane with the multi-rank checks on every GPU of the node, one
rank per GPU over NCCL (``"cuda:nccl,cpu:gloo"`` with CPU offload)::

    python -m lightning_scale.gpu_check --world 8 --out gpu_check_8gpu

(``--world`` sets ``LIGHTNING_SCALE_GPU_WORLD``, which ``tests/test_cuda.py`` reads). The GPT recipe
on the node, through torchrun and the ``lightning-scale`` CLI (:mod:`lightning_scale.cli`)::

    torchrun --standalone --nproc-per-node 8 -m lightning_scale.cli fit \\
        --config recipes/gpt/gpt2-small-ddp-ac-8gpu.yaml --trainer.max_steps 50

This module is also a pytest plugin (``-p lightning_scale.gpu_check``): with
``LIGHTNING_SCALE_GPU_CHECK_PROGRESS`` set it appends the collected test ids and each result to that
file as the run goes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = REPO_ROOT / "tests" / "test_cuda.py"
REPORT_ENV = "LIGHTNING_SCALE_GPU_REPORT"  # tests/test_cuda.py appends its figures there (JSON lines)
PROGRESS_ENV = "LIGHTNING_SCALE_GPU_CHECK_PROGRESS"  # this module's pytest plugin writes there
WORLD_ENV = "LIGHTNING_SCALE_GPU_WORLD"  # ranks of the lane's multi-rank checks
NO_CUDA_LINE = "no CUDA device: every check skipped"
REQUIRED = ("torch", "lightning", "pytest", "torchmetrics")  # modules the lane cannot run without
OPTIONAL = ("triton", "fairscale")  # their checks skip, with the reason, when missing
INTERRUPT_GRACE_S = 15.0  # seconds pytest gets after SIGINT (to write its JUnit XML) before SIGKILL


# ----------------------------------------------------------------------------------------------
# The pytest plugin (loaded in the pytest subprocess with -p lightning_scale.gpu_check)
# ----------------------------------------------------------------------------------------------
def _progress(record: dict[str, Any]) -> None:
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def pytest_collection_finish(session: Any) -> None:
    _progress({"collected": [item.nodeid for item in session.items]})


def pytest_runtest_logreport(report: Any) -> None:
    # One record per test: the call phase, or the setup phase when it skipped or failed there,
    # or the teardown phase when that failed.
    if report.when == "call" or (report.when == "setup" and not report.passed) or (report.when == "teardown"
                                                                                   and report.failed):
        reason = None
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        _progress({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                   "duration_s": round(report.duration, 3), "reason": reason})


# ----------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``, else nvidia-smi)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
        lines = done.stdout.strip().splitlines()
        return lines[0].strip() if done.returncode == 0 and lines else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Devices and versions, as far as torch exposes them (None where it does not)."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "host": platform.node(),
        "lightning": _version("lightning"), "pytest": _version("pytest"),
        "optional": {name: _version(name) for name in OPTIONAL},
        "missing_required": [name for name in REQUIRED if not _importable(name)],
    }
    if not _importable("torch"):
        env.update(torch=None, cuda_available=False, devices=[])
        return env
    import torch

    from lightning_scale.core.device import machine_has_cuda

    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cudnn=None, nccl=None, driver=_driver_version(),
               cuda_available=machine_has_cuda(), devices=[])
    if env["cuda_available"]:
        try:
            env["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001 - a version for the report
            pass
        try:
            nccl = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception:  # noqa: BLE001
            pass
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env["devices"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                   "memory_gib": round(props.total_memory / 2**30, 1),
                                   "capability": f"{props.major}.{props.minor}",
                                   "multiprocessors": props.multi_processor_count})
    return env


# ----------------------------------------------------------------------------------------------
# Running the lane
# ----------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def _run_pytest(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run pytest in its own session; on timeout SIGINT it (it then writes its JUnit XML), then
    SIGKILL its process group after :data:`INTERRUPT_GRACE_S` seconds."""
    start = time.monotonic()
    timed_out = False
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    proc.kill()
                proc.wait()
    return {"returncode": proc.returncode, "timed_out": timed_out, "wall_s": round(time.monotonic() - start, 1)}


def _junit_results(path: Path) -> dict[str, dict[str, Any]]:
    """test name (``test_x[param]``) -> {result, reason, duration_s, message} from a JUnit XML file."""
    if not path.is_file():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for case in root.iter("testcase"):
        result, reason, message = "passed", None, None
        for child in case:
            if child.tag == "skipped":
                result, reason = "skipped", (child.get("message") or "").removeprefix("Skipped: ")
            elif child.tag in ("failure", "error"):
                result = "failed" if child.tag == "failure" else "error"
                message = ((child.get("message") or "") + "\n" + (child.text or "")).strip()
        name = case.get("name", "")
        entry = out.get(name)
        if entry is not None and entry["result"] != "passed":  # an error in teardown after a failure: keep both
            entry["message"] = "\n\n".join(m for m in (entry["message"], message) if m)
            continue
        out[name] = {"result": result, "reason": reason, "duration_s": float(case.get("time", 0) or 0),
                     "message": message, "classname": case.get("classname")}
    return out


def collect_checks(junit: Path, progress: Path, figures: Path, timed_out: bool) -> list[dict[str, Any]]:
    """Every collected check with its result, reason, duration and figures."""
    events = _read_jsonl(progress)
    collected: list[str] = []
    streamed: dict[str, dict[str, Any]] = {}
    for event in events:
        if "collected" in event:
            collected = list(event["collected"])
        elif "nodeid" in event:
            previous = streamed.get(event["nodeid"])
            if previous is None or previous["outcome"] == "passed":
                streamed[event["nodeid"]] = event
    by_name = _junit_results(junit)
    figures_by_id: dict[str, dict[str, Any]] = {}
    for line in _read_jsonl(figures):
        figures_by_id.setdefault(line.get("check", "?"), {}).update(line.get("figures") or {})
    ids = collected or list(streamed) or [f"{(v.get('classname') or '').replace('.', '/')}.py::{k}"
                                          for k, v in by_name.items()]
    checks = []
    for nodeid in ids:
        name = nodeid.split("::", 1)[-1]
        check: dict[str, Any] = {"id": nodeid, "name": name, "result": None, "reason": None, "duration_s": None,
                                 "message": None, "figures": figures_by_id.get(nodeid, {})}
        if name in by_name:
            check.update({k: by_name[name][k] for k in ("result", "reason", "duration_s", "message")})
        elif nodeid in streamed:
            event = streamed[nodeid]
            result = {"passed": "passed", "skipped": "skipped"}.get(event["outcome"], "failed")
            check.update(result=result, reason=event.get("reason"), duration_s=event.get("duration_s"))
        elif timed_out and not any(c["result"] == "interrupted (timeout)" for c in checks):
            check["result"] = "interrupted (timeout)"  # the first check without a result was running
        else:
            check["result"] = "not run (timeout)" if timed_out else "not run"
        checks.append(check)
    return checks


def summarize(env: dict[str, Any], checks: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for c in checks:
        counts[c["result"]] = counts.get(c["result"], 0) + 1
    bad = sum(n for r, n in counts.items() if r not in ("passed", "skipped"))
    if env.get("missing_required"):
        verdict = f"cannot run: missing {', '.join(env['missing_required'])} (nothing is installed by this check)"
    elif not checks:
        verdict = f"no checks ran (pytest exit code {run.get('returncode')}; see pytest.log)"
    elif not env.get("cuda_available") and counts.get("skipped", 0) == len(checks):
        verdict = NO_CUDA_LINE
    else:
        parts = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
        verdict = f"{len(checks)} checks: {parts}" + (" -- TIMED OUT" if run.get("timed_out") else "")
    ok = bool(checks) and bad == 0 and not run.get("timed_out") and not env.get("missing_required")
    return {"verdict": verdict, "counts": counts, "ok": ok}


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if len(value) > 4 or any(isinstance(v, (dict, list)) for v in value):
            return f"[{len(value)} values]"
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in list(value.items())[:6]) + (", ..." if len(value) > 6 else "") + "}"
    return str(value)


def _figures_text(figures: dict[str, Any]) -> str:
    return "; ".join(f"{k}={_short(v)}" for k, v in figures.items()).replace("|", "\\|")


def render_markdown(report: dict[str, Any]) -> str:
    env, run, summary = report["environment"], report["pytest"], report["summary"]
    devices = env.get("devices") or []
    device_text = "; ".join(f"cuda:{d['index']} {d['name']} ({d['memory_gib']} GiB, sm {d['capability']})"
                            for d in devices) or "none (no CUDA device)"
    lines = [
        "# GPU check",
        "",
        f"**{summary['verdict']}**",
        "",
        f"{report['date']} on `{env.get('host')}`; command: `{' '.join(report['command'])}`",
        "",
        "| | |",
        "|---|---|",
        f"| devices | {device_text} |",
        f"| torch | {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, NCCL {env.get('nccl')}) |",
        f"| driver | {env.get('driver')} |",
        f"| lightning | {env.get('lightning')} |",
        f"| python | {env.get('python')} ({env.get('platform')}) |",
        f"| optional | " + ", ".join(f"{k} {v or 'not installed'}" for k, v in (env.get("optional") or {}).items()) + " |",
        f"| lane | multi-rank checks on {report['world']} ranks; timeout {report['timeout_s']:g} s; pytest "
        f"{run.get('wall_s')} s, exit code {run.get('returncode')}{', timed out' if run.get('timed_out') else ''} |",
        "",
        "## Checks",
        "",
        "| check | result | s | figures |",
        "|---|---|---|---|",
    ]
    for c in report["checks"]:
        result = c["result"] + (f": {c['reason']}" if c.get("reason") else "")
        duration = f"{c['duration_s']:.1f}" if isinstance(c.get("duration_s"), (int, float)) else ""
        lines.append(f"| `{c['name']}` | {result.replace('|', '/')} | {duration} | {_figures_text(c['figures'])} |")
    failed = [c for c in report["checks"] if c["result"] not in ("passed", "skipped") and c.get("message")]
    if failed:
        lines += ["", "## Failures", ""]
        for c in failed:
            text = "\n".join(c["message"].splitlines()[-40:])
            lines += [f"### `{c['name']}`", "", "```", text, "```", ""]
    lines += ["", f"Full figures: `gpu_check.json`; pytest output: `pytest.log`; JUnit XML: `junit.xml`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_scale.gpu_check",
                                     description="Run the GPU lane (tests/test_cuda.py) and write gpu_check.md / .json.")
    parser.add_argument("--out", default="gpu_check", help="report folder (default: ./gpu_check)")
    parser.add_argument("--timeout", type=float, default=480.0,
                        help="seconds the pytest run may take (default 480); then it is interrupted, gets "
                             f"{INTERRUPT_GRACE_S:g} s to write its results, and is killed")
    parser.add_argument("--world", type=int, default=None,
                        help=f"ranks of the multi-rank checks ({WORLD_ENV}; default: the variable, else 2); "
                             "8 on an 8-GPU node is the release check")
    parser.add_argument("--tests", default=str(DEFAULT_TESTS), help="the lane's test file (default: tests/test_cuda.py)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression: run only some checks")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0 seconds")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    junit, figures, progress, log = (out / "junit.xml", out / "figures.jsonl", out / "progress.jsonl", out / "pytest.log")
    for stale in (junit, figures, progress):
        stale.unlink(missing_ok=True)
    world = args.world if args.world is not None else int(os.environ.get(WORLD_ENV, "2"))
    child_env = dict(os.environ, **{REPORT_ENV: str(figures), PROGRESS_ENV: str(progress), WORLD_ENV: str(world)})
    cmd = [sys.executable, "-m", "pytest", args.tests, "-m", "cuda", "-p", "no:cacheprovider", "-p", "lightning_scale.gpu_check",
           f"--junitxml={junit}", "-o", "junit_family=xunit2", "-rA", "-q"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    missing = [name for name in REQUIRED if not _importable(name)]
    if missing:
        run = {"returncode": None, "timed_out": False, "wall_s": 0.0}
        env = environment()
    else:
        # The machine's description is read in a thread while pytest starts (both import torch).
        env_holder: dict[str, Any] = {}
        reader = threading.Thread(target=lambda: env_holder.update(environment()), daemon=True)
        reader.start()
        run = _run_pytest(cmd, child_env, log, args.timeout)
        reader.join(timeout=60)
        env = env_holder or {"missing_required": [], "cuda_available": None, "devices": [],
                             "note": "reading the machine's description did not finish"}
    checks = collect_checks(junit, progress, figures, run["timed_out"])
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": [Path(sys.executable).name, "-m", "lightning_scale.gpu_check", *(argv if argv is not None else sys.argv[1:])],
        "pytest_command": cmd, "world": world, "timeout_s": args.timeout, "environment": env, "pytest": run,
        "checks": checks,
    }
    report["summary"] = summarize(env, checks, run)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    text = render_markdown(report)
    (out / "gpu_check.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"report: {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    if env.get("missing_required") or not checks:
        return 2
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
