"""Inside a Slurm job step: srun's task variables -> torch.distributed's, and a rendezvous preflight.

srun starts one task per rank; each reads its rank and the world from SLURM_*. The master is the
first host of SLURM_JOB_NODELIST and the port comes from the job id, so that every task of a job
agrees on them without talking, and two jobs on one node do not share a port.
"""
import errno
import ipaddress
import os
import re
import socket


class SlurmError(Exception):
    """A job set-up the user (or the cluster admin) must fix; the message is one line."""


def in_slurm_step(env=os.environ) -> bool:
    """True inside an srun job step (not in the batch script itself, not outside Slurm)."""
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


def adopt_slurm_env(env=os.environ) -> bool:
    """Translate srun's task variables into torch.distributed's; True if running under srun with
    two or more tasks, or with one in a job of `kiln submit` (KILN_SRUN_RANKS=1: every task is a
    rank; a plain one-task srun of kiln train starts train.nproc local ranks instead).
    KILN_MASTER_ADDR (slurm.master_addr, set by kiln's sbatch script) wins."""
    if not in_slurm_step(env) or (int(env.get("SLURM_NTASKS", 1)) < 2 and env.get("KILN_SRUN_RANKS") != "1"):
        return False
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    nodes = node_count(env)
    if env.get("KILN_MASTER_ADDR"):
        env["MASTER_ADDR"] = env["KILN_MASTER_ADDR"]
    elif nodes == 1:  # every rank is on this node: no name to resolve
        env.setdefault("MASTER_ADDR", "127.0.0.1")
    else:
        env.setdefault("MASTER_ADDR", first_host(job_nodelist(env)))
    env.setdefault("MASTER_PORT", str(job_port(env.get("SLURM_JOB_ID", "0"))))
    return True


def job_port(job_id) -> int:
    """The rendezvous port of a job: 20000-39999, from the job id."""
    return 20000 + int(job_id) % 20000


def job_nodelist(env) -> str:
    return env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))


def node_count(env) -> int:
    n = env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES"))
    return int(n) if n else max(1, len(expand_nodelist(job_nodelist(env))))


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a Slurm nodelist: "gpu[07-08],cpu3" -> ["gpu07", "gpu08", "cpu3"]
    (zero padding kept; several bracket groups in one name expand as a product)."""
    hosts = []
    for part in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", nodelist or ""):
        names = [""]
        for text, rng in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            names = [n + text for n in names]
            if rng:
                names = [n + x for n in names for x in _expand_range(rng)]
        hosts += [n for n in names if n]
    return hosts


def _expand_range(rng: str) -> list[str]:
    out = []
    for item in rng.split(","):
        lo, _, hi = item.partition("-")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist ("n[01-04],m1" -> "n01"); 127.0.0.1 for an empty one."""
    hosts = expand_nodelist(nodelist)
    return hosts[0] if hosts else "127.0.0.1"


def preflight(env=os.environ) -> None:
    """Check the rendezvous before torch.distributed waits on it; SlurmError with one line where a
    peer's script would silently form one world per node, or hang: a loopback master on a
    multi-node job, node or task counts that disagree, a port already taken on the master."""
    nodes, hosts = node_count(env), expand_nodelist(job_nodelist(env))
    if hosts and len(hosts) != nodes:
        raise SlurmError(f"SLURM_JOB_NUM_NODES={nodes} but SLURM_JOB_NODELIST={job_nodelist(env)} names "
                         f"{len(hosts)} hosts: run kiln inside the allocation it was submitted with")
    step_nodes = int(env.get("SLURM_STEP_NUM_NODES", nodes))
    if step_nodes != nodes:
        raise SlurmError(f"the job has {nodes} nodes but this srun step spans {step_nodes}: start the "
                         "step on every node (srun with no -N), or submit with --nodes "
                         f"{step_nodes}")
    for ours, theirs in (("WORLD_SIZE", "SLURM_NTASKS"), ("RANK", "SLURM_PROCID")):
        if env.get(ours, env.get(theirs)) != env.get(theirs):
            raise SlurmError(f"{ours}={env[ours]} in the environment disagrees with {theirs}="
                             f"{env.get(theirs)} from srun (a value exported from the submitting shell?): "
                             f"unset {ours} before sbatch")
    master = env.get("MASTER_ADDR", "")
    if nodes > 1 and not env.get("KILN_MASTER_ADDR"):
        addr = _resolve(master)
        if addr is None:
            raise SlurmError(f"the master host {master} (first of SLURM_JOB_NODELIST) does not resolve "
                             "on this node: ask the admin for resolvable node names, or set "
                             "slurm.master_addr to its address")
        if ipaddress.ip_address(addr).is_loopback:
            raise SlurmError(f"the master host {master} resolves to the loopback address {addr} on a "
                             f"{nodes}-node job, so each node would rendezvous with itself: fix "
                             f"/etc/hosts on {master} (its name must map to an address the other nodes "
                             "reach), or set slurm.master_addr")
    if env.get("SLURM_PROCID") == "0":
        port = int(env.get("MASTER_PORT", 0))
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                raise SlurmError(f"the rendezvous port {port} (from job id {env.get('SLURM_JOB_ID')}) is "
                                 f"already in use on {socket.gethostname()}: export MASTER_PORT=<a free "
                                 "port> before sbatch") from None


def _resolve(host: str) -> str | None:
    try:
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except (socket.gaierror, UnicodeError, IndexError):
        return None
