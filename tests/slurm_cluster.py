"""A private one-node SLURM for the cluster test: munged, slurmctld and slurmd started
from configs under one folder, on the loopback address only, and stopped by process id.

slurmd runs in a mount namespace of its own where that folder's ``etc`` is bind-mounted
on /etc/slurm: the jobs it starts find the config where a cluster node keeps it (the
slurm plugin's job step drops SLURM_CONF before its ``srun``), the machine's /etc/slurm
stays as it is, and every process of the node (job steps, jobs) is known by that
namespace, so that :func:`one_node_cluster` can check that none is left.
"""

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
PROGRAMS += ("unshare", "mount")  # util-linux and mount, for slurmd's namespace
PACKAGES = "slurmctld slurmd slurm-client munge"
POLL_S = 0.2  # sinfo/squeue polling interval while starting and stopping


def _which(program: str) -> str | None:
    """The program's path, looking in the sbin folders too (the daemons live there)."""
    return shutil.which(program, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def missing() -> str | None:
    """Why this machine cannot run the cluster (one line), or None when it can."""
    if os.geteuid() != 0:
        return "needs root: slurmd starts each job as its user"
    absent = [p for p in PROGRAMS if _which(p) is None]
    if absent:
        return f"{', '.join(absent)} not found (`make slurm-deps` installs {PACKAGES})"
    if not Path("/etc/slurm").is_dir():
        return "no /etc/slurm (the SLURM packages make it) to mount the test's config on"
    return None


@dataclass
class Cluster:
    """What a client of the running cluster needs: its folder, environment (SLURM_CONF),
    node name and the node's memory; and what its processes are."""

    root: Path
    env: dict
    node: str
    mem_mb: int
    daemons: list[subprocess.Popen]
    namespace: str  # slurmd's mount namespace, as /proc/PID/ns/mnt names it

    def processes(self) -> list[int]:
        """Pids of the daemons still running and of every process in slurmd's namespace."""
        pids = {d.pid for d in self.daemons if d.poll() is None}
        for entry in Path("/proc").iterdir():
            with suppress(OSError):  # gone meanwhile
                if entry.name.isdigit() and os.readlink(entry / "ns/mnt") == self.namespace:
                    pids.add(int(entry.name))
        return sorted(pids)

    def run(self, *cmd: str) -> str:
        """A SLURM client command against this cluster; its stdout."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still holds (MinJobAge keeps finished ones), as the fields of
        ``scontrol show job --details``: with what its node gave it (``NumCPUs``,
        ``CPU_IDs``, ``Mem``, ``JOB_GRES``)."""
        out = self.run("scontrol", "show", "job", "--details", "--oneliner")
        return [_fields(line) for line in out.splitlines() if line.startswith("JobId=")]


def _fields(line: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` from scontrol as a dict; values with spaces (a job's
    Command or Comment never has one here) would be cut at the space."""
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mb() -> int:
    """The machine's memory as slurmd counts it (MemTotal in MiB)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def write_config(root: Path, node: str, cpus: int, mem_mb: int, gpus: int) -> Path:
    """etc/slurm.conf and etc/gres.conf under ``root`` for one node named ``node`` at
    127.0.0.1, with state, spool, pid and log files under ``root`` too; the first's path."""
    for sub in ("etc", "state", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = f"""\
ClusterName=attnlab-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
# slurmctld, slurmd and srun bind to their host's address (127.0.0.1), not to every one
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# no cgroups: processes are tracked through /proc and tasks are not bound
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# CPUs and memory are what is allocated, so each job's grant is checked against its ask
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
# no slurmdbd: sacct has nothing to read, hence the squeue status command
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# no mail (slurmctld complains when there is no program to send it)
MailProg=/bin/true
# finished jobs stay in slurmctld (squeue, scontrol show job) for this many seconds
MinJobAge=600
MpiDefault=none
ReturnToService=2
GresTypes=gpu
NodeName={node} NodeHostname={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} \
Gres=gpu:{gpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    (root / "etc/slurm.conf").write_text(conf)
    # GPUs as SLURM sees them: gres/gpu drops a GPU without a device file, so each is a
    # character device with /dev/null's numbers (nothing opens it: torch here is CPU-only)
    (root / "dev").mkdir(exist_ok=True)
    lines = []
    for i in range(gpus):
        os.mknod(root / f"dev/nvidia{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        lines.append(f"NodeName={node} Name=gpu File={root}/dev/nvidia{i}\n")
    (root / "etc/gres.conf").write_text("".join(lines))
    return root / "etc/slurm.conf"


def _ip(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host order, x86)."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def tcp_addresses(pids: list[int]) -> set[str]:
    """Every address these processes' TCP sockets use: the local one of each socket and
    the peer of each connected one (a listening socket's peer is no address)."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone meanwhile
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, peer, state, inode = (line.split()[i] for i in (1, 2, 3, 9))
            if inode in inodes:
                found.add(_ip(local.split(":")[0]))
                if state != "0A":  # not LISTEN
                    found.add(_ip(peer.split(":")[0]))
    return found


def _wait(what: str, ready, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s, to one daemon by its pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def one_node_cluster(root: Path, gpus: int = 1) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd (in the foreground, as children of this process)
    for a node with this machine's CPUs and memory and ``gpus`` stand-in GPUs; yield once
    the node is idle. On the way out, also after a failure: cancel every job, stop the
    daemons by pid, kill any process of the cluster still left, and check that none is."""
    node = socket.gethostname().split(".")[0]
    cpus, mem_mb = os.cpu_count(), _mem_total_mb()
    conf = write_config(root, node, cpus, mem_mb, gpus)
    munge = root / "munge"
    # munged wants its socket's folders open to all: --force accepts pytest's 0700 base
    # temp folder, fine since every client here (the daemons, the jobs) runs as root
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> None:
        with open(root / f"log/{name}.out", "w") as out:
            daemons.append(
                subprocess.Popen(
                    cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def client(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)

    def idle() -> bool:
        for name, d in zip(("munged", "slurmctld", "slurmd"), daemons, strict=False):
            if d.poll() is not None:
                out = (root / f"log/{name}.out").read_text()
                raise RuntimeError(f"{name} exited with {d.returncode}: {out}")
        return client("sinfo", "-h", "-N", "-o", "%t").stdout.strip() == "idle"

    cluster = Cluster(root, env, node, mem_mb, daemons, namespace="")
    try:
        start(
            "munged",
            _which("munged"),
            "--foreground",
            "--force",
            f"--socket={munge / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
        )
        _wait("munged's socket", (munge / "munge.socket").exists, 10)
        start("slurmctld", _which("slurmctld"), "-D")
        # unshare and sh exec into slurmd: the pid stays slurmd's
        bind = 'mount --bind "$0" /etc/slurm && exec "$@"'
        unshare = ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", bind)
        start("slurmd", *unshare, str(root / "etc"), _which("slurmd"), "-D", "-N", node)
        _wait("an idle node", idle, 60)
        cluster.namespace = os.readlink(f"/proc/{daemons[-1].pid}/ns/mnt")
        yield cluster
    finally:
        if len(daemons) == 3 and all(d.poll() is None for d in daemons):
            client("scancel", "--full", f"--nodelist={node}")
            with suppress(TimeoutError):
                _wait("the jobs to end", lambda: not client("squeue", "-h").stdout.strip(), 10)
        for proc in reversed(daemons):
            _stop(proc)
        if cluster.namespace:
            for pid in cluster.processes():
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with suppress(TimeoutError):
                _wait("the cluster's last process to go", lambda: not cluster.processes(), 10)
        left = cluster.processes()
        assert not left, f"processes of the test cluster left running: {left}"
