"""Read Weights & Biases offline runs back, and make offline logging safe by default.

W&B in offline mode (``WANDB_MODE=offline``) writes every run to
``<save_dir>/wandb/offline-run-<YYYYMMDD_HHMMSS>-<id>/run-<id>.wandb``: a binary
transaction log (LevelDB-style blocks of ``wandb_internal_pb2.Record`` messages) and no
summary JSON. This module turns such a run back into the rows that were logged, which is
what tests and offline analyses need.

Reader backend
    wandb (>= 0.31 here) ships its own reader for the transaction log: the ``wandb-core``
    binary bundled in the ``wandb`` wheel implements ``wandb leet inspect --json``, which
    prints one JSON object per record. Following the project rule of using the ecosystem
    rather than re-implementing a file format, :func:`read_history` runs that reader
    (``wandb-core leet inspect --no-observability --json --run-file FILE``; no network, no
    TTY, stdin closed, bounded by a timeout) and keeps the ``history`` records. There is no
    Python-level reader API in wandb 0.31 (the old ``wandb.sdk.internal.datastore`` is gone).

    How the inspector renders values, and therefore what :func:`read_history` returns:

    * nested metric keys (``run.log({"a": {"b": 1}})``) come back joined with ``"."``
      (``"a.b"``), the W&B UI's convention. The inspector's output does not distinguish
      that from a literal key ``"a.b"``; keys with ``"/"`` (Lightning's ``"train/loss"``)
      are unchanged.
    * W&B stores non-finite floats as the JSON extensions ``NaN`` / ``Infinity`` /
      ``-Infinity``, which the inspector prints as strings; they are mapped back to
      ``float`` here, so a diverged loss reads as ``math.nan``, not ``"NaN"``.
    * integral floats come back as ``int`` (``0.0`` is stored as ``0`` by W&B itself);
      compare numerically.
    * rows include W&B's bookkeeping keys ``_step``, ``_runtime`` and ``_timestamp``.

Damaged files (documented behaviour)
    * not a W&B transaction log (wrong header), or written by a newer wandb:
      :class:`WandbLogError` naming the file.
    * corrupt data inside the log (checksum mismatch, impossible chunk length):
      :class:`WandbLogError` naming the file; with ``strict=False`` the rows the reader
      recovered are returned instead, with a :class:`WandbLogWarning`.
    * truncated tail (the run crashed, was killed, or is still being written): the rows read
      so far are returned, with a :class:`WandbLogTruncatedWarning` naming the file. An empty
      file (a run killed before its first write) gives ``[]`` and the same warning.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import subprocess
import tempfile
import threading
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "WandbLogError",
    "WandbLogTruncatedWarning",
    "WandbLogWarning",
    "configure_offline_if_needed",
    "find_offline_runs",
    "find_run_file",
    "read_history",
    "read_summary",
]

_log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Start of every W&B transaction log (followed by magic 0xBEE1 and a version byte).
_LOG_IDENT = b":W&B"
_LOG_HEADER_LEN = 7
_RUN_DIR_PREFIX = "offline-run-"
_DEFAULT_BASE_URL = "https://api.wandb.ai"
#: How wandb's inspector spells non-finite floats, which JSON cannot represent.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
#: Substrings of the inspector's stderr diagnostics (wandb-core 0.31).
_MSG_INCOMPLETE = "incomplete .wandb file"
_MSG_CORRUPT = "corrupt data"


class WandbLogError(RuntimeError):
    """A W&B transaction log could not be read (missing, not a W&B log, or corrupt)."""


class WandbLogWarning(UserWarning):
    """A W&B transaction log was read only partially."""


class WandbLogTruncatedWarning(WandbLogWarning):
    """A W&B transaction log ends early (crashed, killed or still running run)."""


# --------------------------------------------------------------------------- locating runs


def find_offline_runs(root: PathLike) -> list[Path]:
    """Return the ``offline-run-*`` directories under a W&B save directory, newest last.

    Args:
        root: the ``save_dir`` given to ``WandbLogger`` / ``wandb.init(dir=...)``, its
            ``wandb/`` (or ``.wandb/``) sub-directory, or an ``offline-run-*`` directory.

    Returns:
        Run directories ordered by the start time encoded in their names
        (``offline-run-YYYYMMDD_HHMMSS-<id>``), ties broken by directory mtime. Symlinks
        such as ``wandb/latest-run`` are not listed. ``[]`` if there are none.
    """
    root = Path(root)
    if root.is_dir() and root.name.startswith(_RUN_DIR_PREFIX) and not root.is_symlink():
        return [root]
    runs: dict[Path, None] = {}
    for base in (root, root / "wandb", root / ".wandb"):
        if base.is_dir():
            for candidate in base.glob(f"{_RUN_DIR_PREFIX}*"):
                if candidate.is_dir() and not candidate.is_symlink():
                    runs[candidate.resolve()] = None

    def start_key(run: Path) -> tuple[str, int]:
        stamp = run.name[len(_RUN_DIR_PREFIX) :].rsplit("-", 1)[0]
        return stamp, run.stat().st_mtime_ns

    return sorted(runs, key=start_key)


def find_run_file(run: PathLike) -> Path:
    """Return the ``run-*.wandb`` transaction log of a run directory (or ``run`` itself).

    Raises:
        FileNotFoundError: ``run`` does not exist, or the directory holds no ``.wandb`` file.
        WandbLogError: the directory holds several ``.wandb`` files (ambiguous).
    """
    path = Path(run)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"No such W&B run directory or .wandb file: {path}")
    files = sorted(path.glob("run-*.wandb")) or sorted(path.glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"No .wandb transaction log in {path}")
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise WandbLogError(f"Several .wandb files in {path} ({names}); pass one of them")
    return files[0]


# --------------------------------------------------------------------------- reading


def read_history(run: PathLike, *, strict: bool = True, timeout: float = 300.0) -> list[dict[str, Any]]:
    """Return every history row (``wandb.log`` / ``WandbLogger.log_metrics`` call) of a run.

    Args:
        run: an ``offline-run-*`` directory or a ``.wandb`` file.
        strict: raise :class:`WandbLogError` on corrupt data inside the log (default). If
            false, return the rows wandb's reader recovered, with a :class:`WandbLogWarning`.
        timeout: seconds after which the reader process is killed and
            :class:`WandbLogError` raised (it reads to the end of the file and exits; this
            is only a guard against a wedged process).

    Returns:
        One dict per logged row, in logged order, mapping metric names to decoded values;
        see the module docstring for key naming and value types.

    Raises:
        FileNotFoundError: no such run directory / file.
        WandbLogError: not a W&B transaction log, written by a newer wandb, corrupt (with
            ``strict``), wandb-core unavailable, or the reader timed out.

    Warns:
        WandbLogTruncatedWarning: the log ends early; the rows read so far are returned.
    """
    path = find_run_file(run)
    if _shorter_than_header(path):
        return []
    rows: list[dict[str, Any]] = []
    for record in _inspect_records(path, strict=strict, timeout=timeout):
        if record.get("type") != "history":
            continue
        items = record.get("history", {}).get("item", {})
        rows.append({key: _decode(value) for key, value in items.items()})
    return rows


def read_summary(run: PathLike, **kwargs: Any) -> dict[str, Any]:
    """Return the last logged value of each key, derived from :func:`read_history`.

    This is the history's final state, not W&B's run summary: values assigned directly to
    ``run.summary`` are not included. Keyword arguments go to :func:`read_history`.
    """
    summary: dict[str, Any] = {}
    for row in read_history(run, **kwargs):
        summary.update(row)
    return summary


def _decode(value: Any) -> Any:
    """Undo the inspector's string spelling of non-finite floats, also inside lists."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _shorter_than_header(path: Path) -> bool:
    """Handle files too short to hold the 7-byte header; True if there is nothing to read.

    A prefix of the header (including an empty file) is a run that died before its first
    record: warn, nothing to read. Anything else is not a W&B log.
    """
    if path.stat().st_size >= _LOG_HEADER_LEN:
        return False
    head = path.read_bytes()
    if not _LOG_IDENT.startswith(head[: len(_LOG_IDENT)]):
        raise WandbLogError(f"{path}: not a W&B transaction log (bad header {head!r})")
    warnings.warn(
        f"{path}: W&B transaction log is truncated ({len(head)} bytes, no records)",
        WandbLogTruncatedWarning,
        stacklevel=3,
    )
    return True


def _core_binary() -> str:
    """Path of the ``wandb-core`` binary bundled with the installed ``wandb``."""
    try:
        from wandb.util import get_core_path
    except ImportError as exc:  # pragma: no cover - wandb is a dependency
        raise WandbLogError("reading .wandb files needs the `wandb` package") from exc
    try:
        return get_core_path()
    except Exception as exc:  # WandbCoreNotAvailableError on unsupported platforms
        raise WandbLogError(f"wandb-core is not available: {exc}") from exc


def _inspect_records(path: Path, *, strict: bool, timeout: float) -> list[dict[str, Any]]:
    """Return the history records of ``path`` as decoded by wandb's own reader.

    The reader's stdout is streamed and only ``history`` records are parsed and kept;
    stderr goes to a temporary file (no pipe to fill up). Its diagnostics are checked once
    the reader has exited. Warnings are attributed to the caller of :func:`read_history`.
    """
    cmd = [
        _core_binary(),
        "leet",
        "inspect",
        "--no-observability",  # no telemetry upload: nothing touches the network
        "--json",  # print records; never opens the interactive TUI
        "--run-file",
        str(path),
    ]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            encoding="utf-8",
            errors="replace",
            close_fds=True,
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.daemon = True
        watchdog.start()
        records: list[dict[str, Any]] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if '"history"' not in line:  # cheap pre-filter; records are one line each
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise WandbLogError(f"{path}: unreadable output from wandb-core: {exc}") from exc
            returncode = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        stderr.seek(0)
        diagnostics = stderr.read().decode("utf-8", errors="replace").strip()

    if timed_out.is_set():
        raise WandbLogError(f"{path}: wandb-core did not finish reading within {timeout:g} s")
    if returncode != 0:
        message = diagnostics.removeprefix("Error:").strip() or f"exit status {returncode}"
        raise WandbLogError(f"{path}: cannot read W&B transaction log: {message}")
    for line in diagnostics.splitlines():
        if _MSG_CORRUPT in line:
            if strict:
                raise WandbLogError(f"{path}: corrupt W&B transaction log: {line}")
            warnings.warn(f"{path}: {line}; returning the records recovered", WandbLogWarning, stacklevel=3)
        elif _MSG_INCOMPLETE in line:
            warnings.warn(
                f"{path}: W&B transaction log ends early (crashed or still running run);"
                f" returning the {sum(r.get('type') == 'history' for r in records)} history rows read",
                WandbLogTruncatedWarning,
                stacklevel=3,
            )
        elif line:
            _log.debug("wandb-core (%s): %s", path, line)
    return records


# --------------------------------------------------------------------------- mode selection


def configure_offline_if_needed(environ: MutableMapping[str, str] | None = None) -> str:
    """Fall back to offline W&B logging when no credentials are configured; return the mode.

    Call this before creating a ``WandbLogger`` (or calling ``wandb.init``). The decision
    uses only environment variables and files, never the network:

    * ``WANDB_MODE`` set: left alone (an explicit choice wins); its value is returned, with
      wandb's legacy aliases normalised (``dryrun`` -> ``offline``, ``run`` -> ``online``).
    * ``WANDB_DISABLED`` true (legacy switch): ``"disabled"``, nothing changed.
    * credentials present (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a netrc
      entry, ``$NETRC`` / ``~/.netrc`` / ``~/_netrc``, for the host of ``WANDB_BASE_URL``,
      default ``api.wandb.ai``): ``"online"``, nothing changed.
    * otherwise ``WANDB_MODE=offline`` is set and ``"offline"`` returned.

    Login prompts: wandb 0.31 prompts for a key only when stdin and stderr are TTYs (or in
    Jupyter); without a TTY an online run with no key raises ``UsageError`` instead of
    waiting. Offline mode never authenticates, so after this call a run without credentials
    neither prompts nor hangs, and ``WANDB_SILENT`` / ``WANDB_CONSOLE`` need not be touched
    (they control output, not login). Not detected: keys passed in-process with
    ``wandb.login(key=...)`` and ``mode`` set in wandb's settings files.

    Args:
        environ: the environment to read and update; defaults to ``os.environ``.

    Returns:
        The W&B mode in effect: ``"online"``, ``"offline"``, ``"disabled"``, or another
        explicit ``WANDB_MODE`` value (e.g. ``"shared"``).
    """
    env = os.environ if environ is None else environ
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode:
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if env.get("WANDB_DISABLED", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "disabled"
    if _has_credentials(env):
        return "online"
    env["WANDB_MODE"] = "offline"
    _log.info("No W&B credentials found: WANDB_MODE=offline (sync later with `wandb sync`)")
    return "offline"


def _has_credentials(env: MutableMapping[str, str]) -> bool:
    """True if W&B would find an API key or identity token without prompting."""
    if env.get("WANDB_API_KEY", "").strip() or env.get("WANDB_IDENTITY_TOKEN_FILE", "").strip():
        return True
    host = urlsplit(env.get("WANDB_BASE_URL", "").strip() or _DEFAULT_BASE_URL).hostname
    if not host:
        return False
    for path in _netrc_candidates(env):
        if not path.is_file():
            continue
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError) as exc:
            _log.warning("Ignoring unreadable netrc file %s: %s", path, exc)
            return False
        return bool(entry and entry[2])
    return False


def _netrc_candidates(env: MutableMapping[str, str]) -> list[Path]:
    """Netrc files in the order wandb consults them (``$NETRC`` alone when it is set)."""
    if env.get("NETRC"):
        return [Path(env["NETRC"]).expanduser()]
    home = env.get("HOME") or os.path.expanduser("~")
    return [Path(home) / ".netrc", Path(home) / "_netrc"]
