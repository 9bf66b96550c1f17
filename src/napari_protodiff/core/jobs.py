"""The run-directory convention shared by every long stage (tiling, embedding, training, ...).

A run directory holds one job, start to end, and whatever it needs to resume::

    RUN_DIR/
      run.json          who owns the folder: job kind and config hash (written once)
      config.json       the stage's full configuration (its pydantic model dumped as JSON)
      manifest.json     package versions, seeds, input paths and hashes, host, start time
      status.json       {"state": running|finished|failed|cancelled, pid, host, step, total,
                         message, error, updated}; written atomically (tmp file + os.replace)
      log.txt           human-readable log lines, appended
      metrics.jsonl     one JSON object per logged step ({"step": ..., "loss": ...})
      checkpoints/      whatever the stage needs to resume (stage-specific files)
      outputs/          the results

A folder belongs to one job: opening it for another job kind or another configuration
(a different config hash) is refused with one sentence, so a resumed run never mixes
two configurations. ``state`` is ``finished`` only after the outputs are complete.
A ``running`` state whose process is gone (killed) is reported as ``interrupted``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import ProtodiffError

RUN_FORMAT = 1
STATES = ("running", "finished", "failed", "cancelled")


class RunDirError(ProtodiffError):
    """A run directory cannot be created, opened or used for this job."""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a JSON-able configuration (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: str | os.PathLike, limit: int | None = None) -> str:
    """``sha256:`` of a file's bytes (or of its first ``limit`` bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return "sha256:" + h.hexdigest()


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("napari-protodiff", "numpy", "zarr", "torch", "torchvision", "timm", "lightly", "safetensors", *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _pid_alive(pid: int | None, host: str | None) -> bool | None:
    """Whether process ``pid`` on ``host`` still runs (``None`` when it cannot be known here)."""
    if not pid or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunDir:
    """One job's run directory (see the module docstring)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # -- files ---------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def _read_json(self, name: str) -> dict[str, Any]:
        p = self.path / name
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{p}: unreadable ({exc}).") from None

    @property
    def owner(self) -> dict[str, Any]:
        return self._read_json("run.json")

    @property
    def kind(self) -> str | None:
        return self.owner.get("kind")

    @property
    def config(self) -> dict[str, Any]:
        return self._read_json("config.json")

    @property
    def manifest(self) -> dict[str, Any]:
        return self._read_json("manifest.json")

    @property
    def status(self) -> dict[str, Any]:
        return self._read_json("status.json")

    @property
    def state(self) -> str:
        """``running``, ``finished``, ``failed``, ``cancelled``, ``interrupted`` (running, process gone) or ``new``."""
        st = self.status
        state = st.get("state", "new")
        if state == "running" and _pid_alive(st.get("pid"), st.get("host")) is False:
            return "interrupted"
        return state

    # -- creation and ownership ------------------------------------------------------------
    @staticmethod
    def is_run_dir(path: str | os.PathLike) -> bool:
        return (Path(path) / "run.json").is_file()

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        """An existing run directory (for inspection)."""
        p = Path(path)
        if not p.is_dir():
            raise RunDirError(f"{p}: no such run directory.")
        if not cls.is_run_dir(p):
            raise RunDirError(f"{p}: not a protodiff run directory (no run.json).")
        return cls(p)

    @classmethod
    def prepare(cls, path: str | os.PathLike, kind: str, config: dict[str, Any], resume: bool = False,
                hash_config: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None) -> "RunDir":
        """Create a run directory for a new job, or reopen it to resume the same job.

        ``config`` is written to config.json; its hash (or that of ``hash_config``, the part
        of the configuration that changes results) identifies the job. Refused with one
        sentence: a folder that is not empty and not a run directory, a run directory of
        another kind or configuration, and an existing run without ``resume``.
        """
        p = Path(path)
        h = config_hash(hash_config if hash_config is not None else config)
        if p.exists() and not p.is_dir():
            raise RunDirError(f"{p}: exists and is a file, not a run directory.")
        if p.is_dir() and any(p.iterdir()):
            if not cls.is_run_dir(p):
                raise RunDirError(f"{p}: exists, is not empty and is not a protodiff run directory; choose another.")
            rd = cls(p)
            owner = rd.owner
            if owner.get("kind") != kind:
                raise RunDirError(f"{p}: belongs to a '{owner.get('kind')}' job, not '{kind}'; choose another run directory.")
            if owner.get("config_hash") != h:
                raise RunDirError(
                    f"{p}: belongs to another {kind} job (different configuration); choose another run directory "
                    "or repeat that job's exact options to resume it."
                )
            if not resume:
                raise RunDirError(f"{p}: already holds this {kind} job ({rd.state}); pass --resume to continue it.")
            st = rd.status
            if st.get("state") == "running" and _pid_alive(st.get("pid"), st.get("host")):
                raise RunDirError(f"{p}: the job is still running (process {st.get('pid')}); cancel it first.")
            return rd
        p.mkdir(parents=True, exist_ok=True)
        rd = cls(p)
        rd.checkpoints.mkdir(exist_ok=True)
        rd.outputs.mkdir(exist_ok=True)
        atomic_write_json(p / "config.json", config)
        man = {"kind": kind, "created": now(), "host": socket.gethostname(), "versions": package_versions(),
               "argv": sys.argv}
        man.update(manifest or {})
        atomic_write_json(p / "manifest.json", man)
        atomic_write_json(p / "run.json", {"format": RUN_FORMAT, "kind": kind, "config_hash": h, "created": now()})
        rd.set_status("new", message="created")
        return rd

    def update_manifest(self, **items: Any) -> None:
        man = self.manifest
        man.update(items)
        atomic_write_json(self.path / "manifest.json", man)

    # -- status, log, metrics -------------------------------------------------------------
    def set_status(self, state: str, **fields: Any) -> None:
        st = self.status
        st.update(fields)
        st.update(state=state, pid=os.getpid(), host=socket.gethostname(), updated=now())
        if state != "failed":
            st.pop("error", None)
        atomic_write_json(self.path / "status.json", st)

    def log(self, message: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"{now()} {message}\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """Every metrics record (a torn last line, from a killed process, is skipped)."""
        out = []
        try:
            with open(self.metrics_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        continue
        except FileNotFoundError:
            pass
        return out

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metrics of steps after ``last_step`` (logged after the checkpoint a resume starts from)."""
        keep = [m for m in self.metrics() if int(m.get("step", 0)) <= last_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in keep))

    @contextlib.contextmanager
    def running(self, **fields: Any) -> Iterator["RunDir"]:
        """Mark the job running; on leaving, ``failed`` / ``cancelled`` unless the body set ``finished``."""
        from .errors import Cancelled

        self.set_status("running", message="started", **fields)
        self.log(f"started (pid {os.getpid()})")
        try:
            yield self
        except BaseException as exc:
            from .interrupts import signal_received

            # Stopped by the user: Cancel, Ctrl-C, SIGTERM, or an error a signal caused on its way
            # (Python turns Ctrl-C during a C extension's import into ImportError).
            stopped = isinstance(exc, (Cancelled, KeyboardInterrupt, GeneratorExit))
            caused = not stopped and signal_received() is not None and not isinstance(exc, SystemExit)
            if stopped or caused:
                msg = f"cancelled ({type(exc).__name__} after the signal)" if caused else (str(exc) or "cancelled")
                self.set_status("cancelled", message=msg)
                self.log("cancelled")
                raise
            msg = str(exc) if isinstance(exc, ProtodiffError) else f"{type(exc).__name__}: {exc}"
            self.set_status("failed", message="failed", error=msg)
            self.log(f"failed: {msg}")
            raise
        else:
            if self.status.get("state") != "finished":
                self.set_status("cancelled", message="stopped before the end")

    # -- summaries ------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        st = self.status
        metrics = self.metrics()
        return {
            "path": str(self.path),
            "kind": self.kind,
            "state": self.state,
            "step": st.get("step"),
            "total": st.get("total"),
            "message": st.get("message"),
            "error": st.get("error"),
            "updated": st.get("updated"),
            "created": self.owner.get("created"),
            "last_metrics": metrics[-1] if metrics else None,
            "outputs": sorted(str(p.relative_to(self.path)) for p in self.outputs.glob("*")) if self.outputs.is_dir() else [],
            "checkpoints": sorted(p.name for p in self.checkpoints.glob("*")) if self.checkpoints.is_dir() else [],
        }


def find_runs(root: str | os.PathLike, max_depth: int = 3) -> list[RunDir]:
    """Run directories at or below ``root`` (a run directory's own sub-folders are not searched)."""
    root = Path(root)
    found: list[RunDir] = []

    def walk(p: Path, depth: int) -> None:
        if RunDir.is_run_dir(p):
            found.append(RunDir(p))
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return
        for c in children:
            walk(c, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found
