"""A real, self-hosted Hugging Face Hub server for the tests: olah serving local git repositories, offline.

olah (https://github.com/vtuber-plan/olah, on PyPI) is a Hub mirror; with ``offline = true`` and ``mirrors-path``
it answers the Hub API (``/api/models/{org}/{name}/revision/{rev}``, ``/tree``, ``/refs``, ``/paths-info``) and
``/{org}/{name}/resolve/{rev}/{file}`` from plain git repositories laid out as ``{mirrors}/models/{org}/{name}``.
Branches and tags resolve to their commit sha through git itself, so what the client records can be checked against
``git rev-parse``. It never contacts huggingface.co in that mode.

The server runs in its own virtual environment (``tests/install-hubserver.sh`` makes ``.venv/hubserver``) so that
its web stack does not leak into the environment whose huggingface_hub client is under test.

Usage::

    from tests.hubserver import hub_server  # the session fixture (or import HubServer and drive it yourself)

    def test_x(hub_server, tmp_path):
        sha = hub_server.publish("acme/tiny-clip", folder, tag="v1")
        HfApi(endpoint=hub_server.endpoint).model_info("acme/tiny-clip", revision="v1").sha == sha
        subprocess.run(["amdet-gate", ...], env=hub_server.client_env(tmp_path / "hf"))

Repositories published while the server runs are served at once (olah opens the git repository per request).
Making a repository private changes the server's access rules, which olah reads at start: ``publish(private=True)``
on a running server restarts it on the same port (about a second or two).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO_ROOT / ".venv" / "hubserver"
INSTALL_HINT = "bash tests/install-hubserver.sh"

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "amdet-gate tests",
    "GIT_AUTHOR_EMAIL": "tests@amdet-gate.invalid",
    "GIT_COMMITTER_NAME": "amdet-gate tests",
    "GIT_COMMITTER_EMAIL": "tests@amdet-gate.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
}

# Hub-related variables a client subprocess must not inherit from the developer's shell.
_HF_VARS = (
    "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "TRANSFORMERS_CACHE", "HF_XET_CACHE",
)

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubServerUnavailable(RuntimeError):
    """olah is not installed: run tests/install-hubserver.sh."""


def find_server_python() -> str:
    """The Python interpreter that has olah: $AMDET_HUBSERVER_PYTHON, .venv/hubserver, or this one."""
    explicit = os.environ.get("AMDET_HUBSERVER_PYTHON")
    if explicit:
        return explicit
    venv_python = DEFAULT_VENV / "bin" / "python"
    if venv_python.exists():
        return str(venv_python)
    if importlib.util.find_spec("olah") is not None:
        return sys.executable
    raise HubServerUnavailable(f"olah (the local Hub server) is not installed; run: {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV}
    done = subprocess.run(
        ["git", "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", "-c", "core.autocrlf=false", *args],
        cwd=repo, env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {done.stderr.strip()}")
    return done.stdout.strip()


class HubServer:
    """olah in offline mirror mode over git repositories under ``root/mirrors``; ``endpoint`` is its base URL."""

    def __init__(self, root: Path, python: str | None = None, port: int | None = None) -> None:
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.mirrors.mkdir(parents=True, exist_ok=True)
        self.python = python or find_server_python()
        self.port = port or free_port()
        self.private: set[str] = set()
        self.log_path = self.root / "olah.log"
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- repositories -------------------------------------------------------------------------------------------

    def repo_path(self, repo_id: str) -> Path:
        if not REPO_ID.match(repo_id):
            raise ValueError(f"repo id must look like 'org/name', got {repo_id!r}")
        org, name = repo_id.split("/")
        return self.mirrors / "models" / org / name

    def publish(
        self,
        repo_id: str,
        folder: Path | str,
        branch: str = "main",
        tag: str | None = None,
        private: bool = False,
        path_in_repo: str = "",
        message: str | None = None,
    ) -> str:
        """Commit ``folder``'s files to ``branch`` of ``repo_id`` (created if new) and return the commit sha.

        The files replace what the branch had at ``path_in_repo`` (the whole tree when empty), so each call is one
        new commit; a new branch starts from ``main`` when it exists. ``tag`` (re)points a tag at the new commit.
        ``private=True`` makes the server answer this repository like the Hub answers a private one to a client
        without access: 401 with X-Error-Code RepoNotFound (huggingface_hub raises RepositoryNotFoundError).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"not a folder: {folder}")
        repo = self.repo_path(repo_id)
        if not (repo / ".git").exists():
            repo.mkdir(parents=True, exist_ok=True)
            git(repo, "init", "-q", "-b", "main")
        branches = set(git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads").split())
        if branch in branches:
            git(repo, "checkout", "-q", "-f", branch)
        elif branches:
            git(repo, "checkout", "-q", "-f", "-b", branch, "main" if "main" in branches else "HEAD")
        else:
            git(repo, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
        target = repo / path_in_repo if path_in_repo else repo
        git(repo, "rm", "-r", "-q", "--ignore-unmatch", "--", path_in_repo or ".")
        if target != repo:
            shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "--allow-empty", "-m", message or f"publish {folder.name} to {branch}")
        sha = git(repo, "rev-parse", "HEAD")
        if tag:
            git(repo, "tag", "-f", tag, sha)
        if private and repo_id not in self.private:
            self.private.add(repo_id)
            if self.running:
                self.restart()
        return sha

    def rev_parse(self, repo_id: str, revision: str) -> str:
        """The commit sha git gives for ``revision`` (branch, tag or sha) of a published repository."""
        return git(self.repo_path(repo_id), "rev-parse", f"{revision}^{{commit}}")

    # ---- process --------------------------------------------------------------------------------------------------

    def _write_config(self) -> Path:
        def q(value: str) -> str:
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = [
            "[basic]",
            'host = "127.0.0.1"',
            f"port = {self.port}",
            f"repos-path = {q(str(self.root / 'cache'))}",
            f"mirrors-path = [{q(str(self.mirrors))}]",
            'mirror-scheme = "http"',
            f"mirror-netloc = {q(f'127.0.0.1:{self.port}')}",
            f"mirror-lfs-netloc = {q(f'127.0.0.1:{self.port}')}",
            "",
            "[accessibility]",
            "offline = true",
            "",
            "[[accessibility.proxy]]",
            'repo = "*"',
            "allow = true",
            "",
            "[[accessibility.proxy]]",
            'repo = "*/*"',
            "allow = true",
        ]
        for repo_id in sorted(self.private):  # the last matching rule wins in olah
            lines += ["", "[[accessibility.proxy]]", f"repo = {q('^' + re.escape(repo_id) + '$')}", "use_re = true",
                      "allow = false"]
        config = self.root / "olah.toml"
        config.write_text("\n".join(lines) + "\n")
        return config

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> HubServer:
        if self.running:
            return self
        config = self._write_config()
        env = {k: v for k, v in os.environ.items() if k not in _HF_VARS and not k.startswith("OLAH_")}
        env["HF_HOME"] = str(self.root / "server-hf-home")
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self._proc = subprocess.Popen(
            [self.python, "-m", "olah.server", "--config", str(config), "--log-path", str(self.root / "logs")],
            cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        probe = f"{self.endpoint}/api/models/amdet-probe/none/revision/main"
        while True:
            if self._proc.poll() is not None:
                self._close_log()
                raise RuntimeError(f"olah exited with {self._proc.returncode} on start:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(probe, timeout=2).close()
                break
            except urllib.error.HTTPError:  # any HTTP answer (a 401 here) means it is serving
                break
            except OSError:
                if time.monotonic() - started > timeout:
                    self.stop()
                    raise RuntimeError(f"olah did not answer within {timeout:.0f}s:\n{self.log_tail()}") from None
                time.sleep(0.1)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._close_log()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- clients ----------------------------------------------------------------------------------------------------

    def client_env(self, hf_home: Path | str, offline: bool = False, **extra: str) -> dict[str, str]:
        """The environment for a client subprocess (the CLI): HF_ENDPOINT set to this server, HF_HOME ``hf_home``.

        huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import, so they take effect in a
        new process; in this process pass ``endpoint=`` and ``cache_dir=`` instead.
        """
        env = {k: v for k, v in os.environ.items() if k not in _HF_VARS}
        env.update(HF_ENDPOINT=self.endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        env.update(extra)
        return env


_shared: HubServer | None = None


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """One olah server for the session (shared even when several modules import this fixture).

    Skips when olah is not installed, except under CI (CI set), where that fails: CI must run install-hubserver.sh.
    """
    global _shared
    if _shared is not None and _shared.running:
        yield _shared
        return
    try:
        server = HubServer(tmp_path_factory.mktemp("hub"))
    except HubServerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    server.start()
    _shared = server
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        _shared = None
