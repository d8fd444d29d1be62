"""A throwaway OpenSSH server on 127.0.0.1 that stands in for a device: its own host key, one authorized user key
(plus a stranger's key it does not accept), a free port. The SSH tests (tests/conftest.py) and bench/device_run.py
start it, so that `edgeprune ship` and the pipeline's remote profile go through real ssh/scp against this machine
or the emulated aarch64 device (devices/sim.py).

Not here: anything a device runs (remote.py, ship.py) or a server for other hosts; it listens on loopback only.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxStartups 100
Subsystem sftp internal-sftp
"""


class SshdUnavailable(RuntimeError):
    """sshd is missing, rejects the configuration or does not start: the caller skips or exits with this line."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalSshd:
    """A running server; `ssh_settings()` is what `edgeprune ship`/`profile.*` take to reach it."""

    dir: Path
    port: int
    user: str
    key: Path
    stranger_key: Path
    known_hosts: Path
    process: subprocess.Popen

    @property
    def host(self) -> str:
        return f"{self.user}@127.0.0.1"

    def ssh_settings(self) -> dict:
        return {"host": self.host, "port": self.port, "key": str(self.key), "known_hosts": str(self.known_hosts)}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self) -> LocalSshd:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True,
                   capture_output=True)
    return path


def start(d: Path, timeout: float = 15.0) -> LocalSshd:
    """Start the server with its keys and configuration in directory `d` (which must exist); raises SshdUnavailable."""
    if not os.path.exists(SSHD):
        raise SshdUnavailable(f"{SSHD} not found (apt-get install openssh-server)")
    _keygen(d / "host_key")
    key, stranger = _keygen(d / "user_key"), _keygen(d / "stranger")
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port = free_port()
    cfg = d / "sshd_config"
    cfg.write_text(CONFIG.format(port=port, dir=d))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    check = subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise SshdUnavailable(f"sshd rejects the configuration: {check.stderr.strip()}")
    with open(d / "sshd.log", "w") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SshdUnavailable(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}") from None
            time.sleep(0.1)
    known_hosts = d / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {(d / 'host_key.pub').read_text()}")
    return LocalSshd(dir=d, port=port, user=getpass.getuser(), key=key, stranger_key=stranger,
                     known_hosts=known_hosts, process=proc)
