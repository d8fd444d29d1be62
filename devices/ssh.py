"""SSH plumbing of the host side: a ``Remote`` (host, port, key, known_hosts, timeouts) and the OpenSSH argument
lists built from it, one-line explanations of OpenSSH failures, shell-safe remote paths, and ``run_streaming``
(a subprocess with live stderr and a timeout). Every call uses ``BatchMode=yes`` (no prompt: an unknown or changed
host key is an error, not a question), a bounded ``ConnectTimeout`` and keep-alives.

Not here: what is sent or run (ship.py, provision.py, remote.py).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from edgeprune.devices.profiles import DeviceProfile

from edgeprune.errors import EdgePruneError

SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+~-]+$")
_SAFE_HOST = re.compile(r"^[A-Za-z0-9._@%:\[\]-]+$")


# ---- processes ------------------------------------------------------------------------------------------------
def run_streaming(cmd: list[str], *, timeout: float | None = None, echo: str | None = None,
                  input_text: str | None = None) -> tuple[int, str, str]:
    """Run ``cmd``; return (exit code, stdout, stderr). Stderr lines are echoed live with the prefix ``echo``
    (None: not echoed). On timeout the process is killed and the exit code is -9."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    out_chunks: list[str] = []
    err_lines: list[str] = []

    def read_err():
        for line in proc.stderr:
            err_lines.append(line)
            if echo is not None and not line.startswith("error: "):
                print(f"{echo}{line}", end="", file=sys.stderr, flush=True)

    def read_out():
        out_chunks.append(proc.stdout.read())

    threads = [threading.Thread(target=read_err, daemon=True), threading.Thread(target=read_out, daemon=True)]
    for t in threads:
        t.start()
    if input_text is not None:
        try:
            proc.stdin.write(input_text)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = -9
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    for t in threads:
        t.join(timeout=5)
    return rc, "".join(out_chunks), "".join(err_lines)


def error_line(stderr: str) -> str:
    for line in reversed(stderr.strip().splitlines()):
        if line.startswith("error: "):
            return line[len("error: "):].strip()
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


# ---- SSH ------------------------------------------------------------------------------------------------------
@dataclass
class Remote:
    host: str  # [user@]address or an ssh_config alias
    port: int | None = None
    key: str | None = None
    known_hosts: str | None = None
    connect_timeout: int = 10
    options: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.host or self.host.startswith("-") or not _SAFE_HOST.match(self.host):
            raise EdgePruneError(f"invalid SSH host {self.host!r} (expected user@address)")
        if self.port is not None and not 0 < int(self.port) < 65536:
            raise EdgePruneError(f"invalid SSH port {self.port}")
        if self.key and not Path(self.key).expanduser().is_file():
            raise EdgePruneError(f"SSH key not found: {self.key}")
        if self.known_hosts and not Path(self.known_hosts).expanduser().is_file():
            raise EdgePruneError(f"known_hosts file not found: {self.known_hosts}")

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}" if self.port else self.host

    def options_args(self) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(self.connect_timeout)}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={Path(self.known_hosts).expanduser()}"]
        if self.key:
            opts += ["-i", str(Path(self.key).expanduser()), "-o", "IdentitiesOnly=yes"]
        for o in self.options:
            opts += ["-o", o]
        return opts

    def ssh(self, remote_command: str) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", *self.options_args(), *port, "--", self.host, remote_command]

    def ssh_command_line(self) -> str:
        """The ``ssh`` invocation for rsync's ``-e``."""
        port = ["-p", str(self.port)] if self.port else []
        return shlex.join(["ssh", *self.options_args(), *port])

    def target(self, remote_path: str) -> str:
        user, at, addr = self.host.rpartition("@")
        if ":" in addr and not addr.startswith("["):  # IPv6 literal
            addr = f"[{addr}]"
        return f"{user}{at}{addr}:{remote_path}"


def resolve_remote(profile: DeviceProfile, host: str | None = None, port: int | None = None, key: str | None = None,
                   known_hosts: str | None = None, connect_timeout: int | None = None) -> Remote:
    s = profile.ssh
    host = host or s.host
    if not host:
        raise EdgePruneError(f"no SSH host for device '{profile.name}': pass --host user@address (make HOST=...) "
                             f"or set [ssh] host in {profile.source}")
    if "@" not in host and s.user:
        host = f"{s.user}@{host}"
    return Remote(host=host, port=port or s.port, key=key or s.key, known_hosts=known_hosts or s.known_hosts,
                  connect_timeout=connect_timeout or s.connect_timeout, options=list(s.options))


_SSH_ERRORS = (
    (("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED", "No ED25519 host key is known",
      "host key for", "No matching host key"),
     "host key of {label} is not trusted: {line} (host keys are checked against known_hosts; after checking the "
     "fingerprint add it with `ssh-keyscan -p PORT ADDRESS >> ~/.ssh/known_hosts`, or pass --known-hosts FILE)"),
    (("Permission denied", "Too many authentication failures", "no mutual signature"),
     "authentication failed for {label}: {line} (BatchMode: no password prompt; pass --key FILE or load the key "
     "into ssh-agent, and check the user)"),
    (("Connection refused",), "cannot connect to {label}: connection refused (is sshd running on that port?)"),
    (("timed out", "Connection timed out"),
     "cannot connect to {label}: no answer within {timeout} s (wrong address, host down or firewalled?)"),
    (("No route to host", "Network is unreachable", "Host is unreachable"),
     "cannot connect to {label}: host unreachable ({line})"),
    (("Could not resolve hostname", "Name or service not known", "nodename nor servname"),
     "cannot connect to {label}: unknown host name ({line})"),
    (("Connection closed", "Connection reset", "Broken pipe", "kex_exchange_identification"),
     "connection to {label} was closed: {line}"),
)


def ssh_error(remote: Remote, stderr: str) -> str | None:
    """A one-line explanation of an OpenSSH failure, or None when stderr shows none."""
    for needles, template in _SSH_ERRORS:
        for line in stderr.splitlines():
            if any(n.lower() in line.lower() for n in needles):
                line = line.strip().removeprefix("ssh: ")
                return template.format(label=remote.label, line=line, timeout=remote.connect_timeout)
    return None


def safe_remote_path(path: str, what: str) -> str:
    """A path relative to the login directory (``~/x`` -> ``x``) or absolute, in a shell-safe character set."""
    if path.startswith("~/"):
        path = path[2:]
    elif path == "~":
        path = "."
    path = path.rstrip("/") or "/"
    if not SAFE_PATH.match(path) or path.startswith("-") or "~" in path or ".." in path.split("/"):
        raise EdgePruneError(f"{what} {path!r}: use letters, digits and . _ - + / only (no spaces, no ..)")
    return path


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".-") or "artifact"
