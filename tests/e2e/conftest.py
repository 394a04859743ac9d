"""End-to-end fixtures: a real `dagster dev` (webserver + daemon + code server) on a loopback port.

The server gets its own temporary DAGSTER_HOME (the project's dagster.yaml: telemetry and nux off, the
default run launcher, the concurrency limits), results root and MLflow store; it is shared by the
GraphQL and browser tests of a session and stopped (its whole process group) at the end, whatever
happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parents[2]
PYTHON_BIN = PROJECT / ".venv" / "bin"
LOCATION_PREFIX = "emotion_assets.definitions"
REPOSITORY = "__repository__"
SERVER_START_TIMEOUT = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bin_path(name: str) -> str:
    path = PYTHON_BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def isolated_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess whose state all lives under ``root``."""
    env = dict(os.environ)
    env.update(
        {
            "DAGSTER_HOME": str(root / "dagster_home"),
            "EMOTION_RESULTS_DIR": str(root / "results"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "EMOTION_MLFLOW_ARTIFACTS": str(root / "mlartifacts"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "DAGSTER_DISABLE_TELEMETRY": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    for name in ("EMOTION_MODEL_REGISTRY", "EMOTION_PROFILES"):
        if name not in extra:
            env.pop(name, None)
    (root / "dagster_home").mkdir(parents=True, exist_ok=True)
    (root / "results").mkdir(parents=True, exist_ok=True)
    return env


def init_mlflow_store(tracking_uri: str) -> None:
    """Create the MLflow schema up front: runs that start together on a fresh SQLite store race on it."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).search_experiments()


def write_instance_yaml(home: Path, extra: str = "") -> Path:
    """The project's dagster.yaml (telemetry and nux off, pools, run-queue limits) plus ``extra``."""
    home.mkdir(parents=True, exist_ok=True)
    text = (PROJECT / "dagster_home" / "dagster.yaml").read_text()
    path = home / "dagster.yaml"
    path.write_text(text + ("\n" + extra if extra else ""))
    return path


def _group_alive(pgid: int) -> bool:
    """Whether a non-zombie process of group ``pgid`` exists (zombies may never be reaped here)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def stop_process_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group started for ``proc`` (``start_new_session``), then SIGKILL what is left."""
    pgid = proc.pid  # the session leader's pid is the group id
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            if not _group_alive(pgid):
                return
            time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@dataclass
class DagsterServer:
    url: str
    root: Path
    env: dict[str, str]
    proc: subprocess.Popen
    log_path: Path
    location: str = ""

    @property
    def graphql_url(self) -> str:
        return f"{self.url}/graphql"

    def graphql(self, query: str, variables: dict[str, Any] | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            self.graphql_url, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {json.dumps(payload['errors'], indent=1)[:4000]}")
        return payload["data"]

    def log_tail(self, n: int = 80) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-n:])


LOCATION_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
        }
      }
    }
  }
}
"""


def _wait_until_ready(server: DagsterServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"dagster dev exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            data = server.graphql(LOCATION_QUERY, timeout=10)
            entries = data["workspaceOrError"].get("locationEntries", [])
            states = {e["name"]: e["locationOrLoadError"] for e in entries}
            name = next((n for n in states if n.startswith(LOCATION_PREFIX)), "")
            loaded = states.get(name) or {}
            if loaded.get("__typename") == "RepositoryLocation":
                server.location = name
                return
            if loaded.get("__typename") == "PythonError":
                raise AssertionError(f"code location failed to load: {loaded.get('message')}")
            last = json.dumps(states)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise AssertionError(f"dagster dev not ready after {timeout:.0f} s ({last}):\n{server.log_tail()}")


def start_dagster_dev(
    root: Path, extra_env: dict[str, str] | None = None, instance_yaml: Path | None = None
) -> DagsterServer:
    """`dagster dev` for the project's workspace on 127.0.0.1, state under ``root``; returns when loaded.

    ``extra_env`` is added to its environment; ``instance_yaml`` replaces the project's dagster.yaml.
    """
    env = isolated_env(root, **(extra_env or {}))
    if instance_yaml is None:
        write_instance_yaml(Path(env["DAGSTER_HOME"]))
    else:
        shutil.copy(instance_yaml, Path(env["DAGSTER_HOME"]) / "dagster.yaml")
    init_mlflow_store(env["MLFLOW_TRACKING_URI"])
    port = free_port()
    log_path = root / "dagster-dev.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [bin_path("dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = DagsterServer(url=f"http://127.0.0.1:{port}", root=root, env=env, proc=proc, log_path=log_path)
    started = time.monotonic()
    try:
        _wait_until_ready(server, SERVER_START_TIMEOUT)
    except BaseException:
        stop_process_group(proc)
        log.close()
        raise
    print(f"dagster dev ready at {server.url} after {time.monotonic() - started:.1f} s")
    return server


@pytest.fixture(scope="session")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterServer]:
    """One `dagster dev` shared by the webserver and browser tests of the session."""
    root = tmp_path_factory.mktemp("dagster-dev")
    server = start_dagster_dev(root)
    try:
        yield server
    finally:
        stop_process_group(server.proc)
        print(f"dagster dev stopped; last log lines:\n{server.log_tail(15)}")


RUNS_QUERY = """
query ($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId status jobName tags { key value } } }
    ... on PythonError { message }
  }
}
"""


def runs(server: DagsterServer, run_filter: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    data = server.graphql(RUNS_QUERY, {"filter": run_filter or {}})
    result = data["runsOrError"]
    assert result["__typename"] == "Runs", result
    return result["results"]


def run_failure_details(server: DagsterServer, run_id: str) -> str:
    """Error messages of a failed run (for assertion messages)."""
    query = """
    query ($runId: ID!) {
      logsForRun(runId: $runId, limit: 2000) {
        ... on EventConnection {
          events {
            __typename
            ... on ExecutionStepFailureEvent { stepKey error { message } }
            ... on RunFailureEvent { message }
            ... on EngineEvent { message error { message } }
          }
        }
      }
    }
    """
    try:
        events = server.graphql(query, {"runId": run_id})["logsForRun"].get("events", [])
    except AssertionError as exc:
        return str(exc)
    lines = []
    for event in events:
        error = (event.get("error") or {}).get("message")
        if error or event["__typename"] in ("RunFailureEvent", "ExecutionStepFailureEvent"):
            lines.append(f"{event['__typename']} {event.get('stepKey', '')}: {error or event.get('message')}")
    return "\n".join(lines[-10:]) or "(no error events)"
