"""Training runs in the background: start one as a separate process, find it again, follow it, cancel it.

The app must not train in its own script thread (the page would freeze and a reload would lose
the run), so `start_training` launches `python -m mammo_core train ... --progress-file` in a new
session (process group) and writes a run record, `weights/.runs/<run_id>/run.json`, next to the
run's log and progress files. Any process (a reloaded page, a second tab, a new server) reads
those files to learn what is running: `current_run` and `list_runs` combine the record, the
progress JSON that `mammo_core.training.train` writes and whether the process is still alive.

One training at a time: the training lock in `mammo_core.training.train` is the real guard; `start_training`
also refuses while the newest run's process is alive but has not taken the lock yet.

Training data comes only from configured roots (`MAMMO_DATA_ROOTS`, folders separated by ':';
default: `MAMMO_DATA_DIR`): `resolve_training_data` refuses any other folder, symlinks resolved,
with a message that names the folder typed and never lists a directory's contents. Before a run
starts, `start_training` checks the weights folder is writable and has room, so a read-only or
full disk is one clear line instead of a run that fails later.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mammo_core.config import REPO_ROOT, data_dir, weights_dir
from mammo_core.errors import DatasetError, ModelDirError, TrainingBusyError
from mammo_core.store.files import atomic_write_text, storage_error_message
from mammo_core.store.procs import pid_running

DATA_ROOTS_ENV = "MAMMO_DATA_ROOTS"
#: Free space a training run needs in the weights folder before it starts (model, card, predictions).
MIN_FREE_BYTES = 200 * 1024 * 1024

RUNS_DIR = ".runs"
RUN_FILE = "run.json"
LOG_FILE = "train.log"
PROGRESS_FILE = "progress.json"

#: States a run can be in. "starting": alive, no progress yet (decoding the dataset);
#: "died": the process is gone without writing a final state (killed, crashed hard).
ACTIVE_STATES = ("starting", "running")
FINAL_STATES = ("finished", "failed", "cancelled", "died")

# Processes started by this interpreter: polled instead of probed so that a finished child is
# reaped (otherwise it lingers as a zombie and looks alive to os.kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass
class Run:
    """A training run: its record on disk plus what is known about it now.

    `state` is one of ACTIVE_STATES or FINAL_STATES; `progress` is the last progress JSON (epoch,
    step, logs, history while running; the model name and test metrics when finished).
    """

    run_id: str
    run_dir: Path
    pid: int
    model: str
    args: list[str]
    config: dict[str, Any]
    started: str
    log_path: Path
    progress_path: Path
    root: Path
    state: str = "starting"
    progress: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def error(self) -> str | None:
        """Why the run did not finish, when it did not: the trainer's message or the log's last line."""
        if self.state in ("failed", "cancelled"):
            return _readable_error(self.progress.get("error")) or self.state
        if self.state == "died":
            tail = log_tail(self, lines=1).strip()
            return f"the training process ended without a result ({tail or 'no log output'})."
        return None

    def fraction_done(self) -> float:
        """0..1 from epoch and step (1.0 when finished)."""
        if self.state == "finished":
            return 1.0
        p = self.progress
        epochs, steps = max(int(p.get("epochs") or 1), 1), max(int(p.get("steps") or 1), 1)
        epoch, step = int(p.get("epoch") or 0), int(p.get("step") or 0)
        if epoch < 1:
            return 0.0
        return min(1.0, ((epoch - 1) + min(step, steps) / steps) / epochs)


_OS_ERROR = re.compile(r"^\[Errno (\d+)\] ([^:]*)(?:: '(.*)')?$")


def _readable_error(text: str | None) -> str | None:
    """A trainer's str(OSError) ("[Errno 28] No space left on device: '/w/...'") as one plain line."""
    match = _OS_ERROR.match(text or "")
    if not match:
        return text
    code, strerror, filename = int(match.group(1)), match.group(2), match.group(3)
    return storage_error_message(OSError(code, strerror, filename), "the new model")


def data_roots() -> list[Path]:
    """The folders training data may come from: MAMMO_DATA_ROOTS (':'-separated), else MAMMO_DATA_DIR."""
    value = os.environ.get(DATA_ROOTS_ENV, "")
    roots = [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]
    if not roots and data_dir() is not None:
        roots = [data_dir()]
    return roots


def resolve_training_data(typed: str | Path, roots: list[Path] | None = None) -> Path:
    """The real path of the dataset folder `typed`, when it lies inside a configured root.

    A relative path is taken inside the first root. Symlinks are resolved before the check, so a link
    cannot lead outside. Raises DatasetError naming `typed` (never listing any folder) otherwise.
    """
    text = str(typed).strip()
    if not text:
        raise DatasetError("enter the dataset folder.")
    roots = data_roots() if roots is None else roots
    if not roots:
        raise DatasetError(f"{text}: no training data folders are configured on this server; an administrator "
                           f"sets {DATA_ROOTS_ENV} (or MAMMO_DATA_DIR).")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = roots[0] / path
    real = Path(os.path.realpath(path))
    for root in roots:
        base = Path(os.path.realpath(root))
        if real == base or real.is_relative_to(base):
            if not real.is_dir():
                raise DatasetError(f"{text}: dataset folder not found.")
            return real
    raise DatasetError(f"{text}: not inside a training data folder configured on this server "
                       f"({', '.join(str(r) for r in roots)}).")


def check_writable(root: Path, need: int = MIN_FREE_BYTES) -> None:
    """ModelDirError in one line when the weights folder is read-only, not writable or nearly full."""
    import shutil

    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        free = shutil.disk_usage(root).free
    except OSError as exc:
        raise ModelDirError(storage_error_message(exc, "the new model")) from None
    if free < need:
        raise ModelDirError(f"{root}: only {free // 2**20} MB free, a training run needs about {need // 2**20} MB; "
                            "free some space and retry.")


def runs_dir(root: str | Path | None = None) -> Path:
    root = Path(root) if root is not None else weights_dir()
    return root / RUNS_DIR


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _run_alive(pid: int, progress_path: Path | None = None) -> tuple[bool, int | None]:
    """Is this training run's process alive: (alive, returncode if known). A child of ours is polled;
    another process must be running (`procs.pid_running`), ours, and still have the run's progress file
    on its command line (guards against pid reuse)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        code = child.poll()
        if code is None:
            return True, None
        _CHILDREN.pop(pid, None)
        return False, code
    if not pid_running(pid):
        return False, None
    proc = Path("/proc") / str(pid)
    with contextlib.suppress(OSError):
        if proc.stat().st_uid != os.getuid():  # exists, owned by someone else: not ours
            return False, None
    if progress_path is not None:
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if str(progress_path) not in cmdline:
                return False, None  # the pid now belongs to another process
    return True, None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def load_run(run_dir: str | Path) -> Run | None:
    """Read a run record and work out its state now; None when the record is missing or unreadable."""
    run_dir = Path(run_dir)
    rec = _read_json(run_dir / RUN_FILE)
    if not rec.get("run_id") or not rec.get("pid"):
        return None
    run = Run(
        run_id=rec["run_id"], run_dir=run_dir, pid=int(rec["pid"]), model=rec.get("model", ""),
        args=list(rec.get("args", [])), config=dict(rec.get("config", {})), started=rec.get("started", ""),
        log_path=Path(rec.get("log_path", run_dir / LOG_FILE)),
        progress_path=Path(rec.get("progress_path", run_dir / PROGRESS_FILE)),
        root=Path(rec.get("root", run_dir.parent.parent)),
    )
    alive, code = _run_alive(run.pid, run.progress_path)
    run.returncode = code if code is not None else rec.get("returncode")
    run.progress = _read_json(run.progress_path)
    reported = run.progress.get("state")
    if reported in ("finished", "failed", "cancelled"):
        run.state = reported
    elif alive:
        run.state = "running" if reported == "running" else "starting"
    else:
        # Gone without a final word. Re-read once: the trainer writes its final state just before exiting.
        run.progress = _read_json(run.progress_path) or run.progress
        reported = run.progress.get("state")
        run.state = reported if reported in ("finished", "failed", "cancelled") else "died"
        if run.state == "died" and run.returncode == 130:
            run.state = "cancelled"
    return run


def list_runs(root: str | Path | None = None) -> list[Run]:
    """Every recorded run under `root/.runs`, newest first."""
    base = runs_dir(root)
    if not base.is_dir():
        return []
    runs = [r for d in base.iterdir() if d.is_dir() and (r := load_run(d)) is not None]
    return sorted(runs, key=lambda r: (r.started, r.run_id), reverse=True)


def current_run(root: str | Path | None = None) -> Run | None:
    """The newest run (active or not), or None when no run was ever started here."""
    runs = list_runs(root)
    return runs[0] if runs else None


def cli_args(config: Any, root: Path, progress_path: Path) -> list[str]:
    """The `python -m mammo_core train` command line for a TrainConfig."""
    args = [sys.executable, "-m", "mammo_core", "--weights", str(root), "train",
            "--data", str(config.data_dir), "--name", config.name, "--arch", config.architecture,
            "--protocol", config.protocol, "--group-by", config.group_by,
            "--epochs", str(config.epochs), "--batch-size", str(config.batch_size), "--seed", str(config.seed),
            "--channels", str(config.channels), "--precision", config.precision, "--progress-file", str(progress_path)]
    if config.patient_map:
        args += ["--patient-map", str(config.patient_map)]
    if config.learning_rate is not None:
        args += ["--learning-rate", str(config.learning_rate)]
    if config.max_steps_per_epoch:
        args += ["--max-steps", str(config.max_steps_per_epoch)]
    return args


@contextlib.contextmanager
def _start_lock(base: Path):
    """Serialises concurrent Start clicks (two tabs) between the busy check and the launch."""
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".start.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def start_training(config: Any, root: str | Path | None = None, *, check_dataset: bool = True,
                   env: dict[str, str] | None = None, data_roots_: list[Path] | None = None) -> Run:
    """Launch a training run of `config` (a `mammo_core.training.train.TrainConfig`) in the background.

    Validates the options (ValueError), the dataset folder against the configured roots
    (DatasetError; `data_roots_` overrides them), the model name (FileExistsError when taken), the
    weights folder (ModelDirError when read-only or full) and, with `check_dataset`, the dataset
    layout (DatasetError) before launching, so mistakes show at once. Raises TrainingBusyError when
    a run is already in progress. Returns the new Run.
    """
    from mammo_core.data.datasets import patient_map_for, scan_dataset
    from mammo_core.store.run_safety import training_in_progress

    root = Path(root) if root is not None else weights_dir()
    root = root.resolve()
    config.data_dir = str(resolve_training_data(config.data_dir, data_roots_))
    if config.protocol == "grouped":
        config.patient_map = patient_map_for(config.data_dir, config.group_by, config.patient_map or None)
    config.validate()
    if (root / config.name).exists():
        raise FileExistsError(f"a model named {config.name!r} already exists in {root}; choose another name.")
    check_writable(root)
    if check_dataset:
        scan_dataset(config.data_dir, patient_map=config.patient_map)
    base = runs_dir(root)
    with _start_lock(base):
        latest = current_run(root)
        if training_in_progress(root) or (latest is not None and latest.active):
            who = f" ({latest.model}, started {latest.started})" if latest is not None and latest.active else ""
            raise TrainingBusyError(f"a training run is already in progress{who}; wait for it or cancel it.")
        run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{config.name}"
        run_dir = base / run_id
        run_dir.mkdir(parents=True)
        log_path, progress_path = run_dir / LOG_FILE, run_dir / PROGRESS_FILE
        args = cli_args(config, root, progress_path)
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH", "")]))
        child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=str(REPO_ROOT), env=child_env, start_new_session=True, close_fds=True)
        _CHILDREN[proc.pid] = proc
        from dataclasses import asdict

        record = {"run_id": run_id, "pid": proc.pid, "model": config.name, "args": args, "config": asdict(config),
                  "started": _now(), "log_path": str(log_path), "progress_path": str(progress_path), "root": str(root)}
        atomic_write_text(run_dir / RUN_FILE, json.dumps(record, indent=2) + "\n")
    run = load_run(run_dir)
    assert run is not None
    return run


def cancel(run: Run, *, timeout: float = 60.0) -> Run:
    """Stop a run: SIGTERM to its process group (the trainer cleans up and records "cancelled"),
    SIGKILL if it has not exited after `timeout` seconds. Returns the run's new state."""
    alive, _ = _run_alive(run.pid, run.progress_path)
    if alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGTERM)  # start_new_session made pid the group leader
        if not _wait_dead(run, timeout):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.pid, signal.SIGKILL)
            _wait_dead(run, 10.0)
    updated = load_run(run.run_dir) or run
    if updated.state == "died":  # killed before it could say so
        atomic_write_text(updated.progress_path, json.dumps({"state": "cancelled", "error": "training cancelled"}))
        updated = load_run(run.run_dir) or updated
    return updated


def _wait_dead(run: Run, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _run_alive(run.pid, run.progress_path)[0]:
            return True
        time.sleep(0.2)
    return False


def wait(run: Run, *, timeout: float = 600.0, poll: float = 0.5) -> Run:
    """Block until the run is no longer active (for tests and scripts); TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        now = load_run(run.run_dir) or run
        if not now.active:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"training run {run.run_id} still {now.state} after {timeout:.0f} s")
        time.sleep(poll)


def log_tail(run: Run, *, lines: int = 20) -> str:
    """The last `lines` lines of the run's log (TensorFlow's start-up chatter included)."""
    try:
        with open(run.log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def history_rows(run: Run) -> list[dict[str, Any]]:
    """Per-epoch rows (epoch, loss, accuracy, val_...) so far: from the progress file while running,
    from the finished model's history.csv afterwards."""
    rows = list(run.progress.get("history") or [])
    if run.state == "finished":
        import csv

        path = run.root / run.progress.get("model", run.model) / "history.csv"
        with contextlib.suppress(OSError):
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    return rows
