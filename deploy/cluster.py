#!/usr/bin/env python3
"""Start and stop a Ray cluster for the pipeline, with token authentication.

    python deploy/cluster.py up [--nodes 2]      a head and N-1 workers on this host
    python deploy/cluster.py join HEAD:PORT      a worker on another host joins that head
    python deploy/cluster.py env                 print the lines to export (token, addresses)
    python deploy/cluster.py down                stop exactly the nodes up/join started here

`make cluster-up NODES=2` / `make cluster-down` run it with the venv's `ray`. Its state (the
token, `cluster.env`, the node list, each node's output) lives in `.ray_cluster/` of the
repository, which git and therefore `ray job submit --working-dir .` ignore. What it does, and
why, is what two Ray nodes on one host need (README, "Running on a Ray cluster"):

* RAY_AUTH_MODE=token and RAY_AUTH_TOKEN are in the environment of every `ray start`: a node
  reads them once, when it starts, and a job inherits that environment;
* every node has its own temp dir (else the second node's log monitor re-prints the first
  one's logs) and its own dashboard-agent and client-server ports (else they fail to bind);
* nodes run as `ray start --block` in their own sessions, so `down` stops exactly them: `ray
  stop` would kill every Ray process of this user on the host, other clusters included.

Standard library only: `down` works without the venv.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO_ROOT / ".ray_cluster"
DEFAULT_PORT = 6379  # Ray's defaults: what a newcomer finds in Ray's documentation
DEFAULT_DASHBOARD_PORT = 8265
START_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0


class ClusterError(RuntimeError):
    """A failure the user can fix; printed as one `error: ...` line."""


@dataclass
class Node:
    """One `ray start --block` process this script started."""

    name: str
    pid: int
    start_ticks: str  # /proc/<pid>/stat field 22: tells this process from a later one, same pid
    temp_dir: str
    log: str


@dataclass
class State:
    """`cluster.json`: what `up`/`join` started, for `env` and `down`."""

    head: str  # GCS address host:port (RAY_ADDRESS of a driver, --address of `ray start`)
    dashboard: str  # http://host:port (ray job submit/logs/status --address)
    temp_root: str
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: Path) -> State | None:
        path = state_dir / "cluster.json"
        if not path.exists():
            return None
        values = json.loads(path.read_text())
        return cls(**{**values, "nodes": [Node(**node) for node in values["nodes"]]})

    def save(self, state_dir: Path) -> None:
        (state_dir / "cluster.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


# --- processes ----------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start ticks, state) of a live process; None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19], fields[0]


def _is_ours(node: Node) -> bool:
    """Whether the node's process is still the one we started (not a recycled pid)."""
    stat = _stat(node.pid)
    return stat is not None and stat[1] == node.start_ticks and stat[2] != "Z"


def _processes() -> dict[int, tuple[int, str, str]]:
    """This user's live processes: pid -> (parent pid, start ticks, command line)."""
    table = {}
    uid = os.getuid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat[2] != "Z":  # zombies are dead, just not reaped yet
            table[int(entry.name)] = (stat[0], stat[1], cmdline)
    return table


def cluster_processes(roots: Iterable[int], temp_root: str) -> set[tuple[int, str]]:
    """(pid, start ticks) of the node processes and all their descendants (Ray renames its
    workers `ray::...`, so only the tree finds them), plus orphans naming the cluster's temp
    root (Ray processes whose parent died before them; not, say, a `tail -f` of their log)."""
    table = _processes()
    tree: set[int] = set()
    frontier = [pid for pid in roots if pid in table]
    while frontier:
        tree.update(frontier)
        frontier = [pid for pid, (ppid, _, _) in table.items()
                    if ppid in frontier and pid not in tree]
    orphans = {pid for pid, (ppid, _, cmdline) in table.items()
               if ppid == 1 and temp_root in cmdline}
    return {(pid, table[pid][1]) for pid in tree | orphans}


def _alive(processes: set[tuple[int, str]]) -> list[int]:
    """The pids of `processes` that are still the same live processes."""
    return sorted(pid for pid, ticks in processes
                  if (stat := _stat(pid)) is not None and stat[1] == ticks and stat[2] != "Z")


def _stop_node(node: Node) -> None:
    """SIGTERM to a live `ray start --block` (it stops the processes it started), then SIGKILL
    to whatever is left of its process group (its own session: nobody else is in it)."""
    os.kill(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _is_ours(node) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signal.SIGKILL)


# --- ray ----------------------------------------------------------------------------------------


def _ray() -> str:
    """The `ray` beside this Python (the venv's), else the first on PATH."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("no `ray` command: run `make venv` (or activate the venv) first")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for ports the user never needs to know)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _http_json(url: str, token: str) -> object | None:
    """GET `url` with the cluster token; parsed JSON, or None when it does not answer (yet)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # our own dashboard
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def alive_nodes(dashboard: str, token: str) -> int:
    """How many nodes the head's state API lists as ALIVE (0 when it does not answer)."""
    answer = _http_json(f"{dashboard}/api/v0/nodes?limit=1000&detail=false", token)
    try:
        nodes = answer["data"]["result"]["result"]  # type: ignore[index]
    except (TypeError, KeyError):
        return 0
    return sum(1 for node in nodes if node.get("state") == "ALIVE")


def _tail(path: str, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- token and environment ----------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    """Write a file only this user can read (it holds the token)."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def cluster_token(state_dir: Path, create: bool) -> str:
    """$RAY_AUTH_TOKEN when exported, else the state dir's token file, else (for `up`) a new
    random one written there."""
    exported = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    token_file = state_dir / "token"
    if exported:
        token = exported
    elif token_file.exists():
        token = token_file.read_text().strip()
    elif create:
        token = secrets.token_hex(32)
    else:
        raise ClusterError(
            "no cluster token: export RAY_AUTH_TOKEN=<the head's token> (the head host has it "
            f"in {token_file}) and run this again"
        )
    _write_private(token_file, token + "\n")
    return token


def env_lines(state: State, state_dir: Path) -> str:
    """The shell lines every client of the cluster needs (what `cluster.env` holds)."""
    return "\n".join([
        f"# Ray cluster of {REPO_ROOT} (deploy/cluster.py): `source` this file in every shell",
        "# that submits jobs or drives training on it.",
        "export RAY_AUTH_MODE=token",
        f"export RAY_AUTH_TOKEN=\"$(cat '{state_dir / 'token'}')\"",
        f"export CLUSTER_HEAD={state.head}            # RAY_ADDRESS=$CLUSTER_HEAD: a driver",
        f"export CLUSTER_DASHBOARD={state.dashboard}  # ray job ... --address",
        "",
    ])


def node_env(token: str, ray: str) -> dict[str, str]:
    """Environment of `ray start`: the token (read once, at start; jobs inherit it) and the
    venv first on PATH, so a job's `python` is the venv's."""
    return {
        **os.environ,
        "PATH": f"{Path(ray).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }


# --- up / join / down ---------------------------------------------------------------------------


def _temp_root(state_dir: Path) -> Path:
    # Short: Ray puts Unix sockets under a node's temp dir, and their paths may have 107 bytes.
    return Path("/tmp") / f"ray-cluster-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]}"


def _start_node(name: str, args: list[str], state: State, state_dir: Path,
                env: dict[str, str]) -> Node:
    temp_dir = Path(state.temp_root) / name
    log = state_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [_ray(), "start", *args, "--temp-dir", str(temp_dir),
               "--dashboard-agent-listen-port", str(free_port()),
               "--block", "--disable-usage-stats"]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    stat = _stat(process.pid)
    node = Node(name, process.pid, stat[1] if stat else "", str(temp_dir), str(log))
    state.nodes.append(node)
    state.save(state_dir)  # at once: `down` must find it even if `up` fails later
    return node


def _wait(what: str, ready: Callable[[], bool], state: State,
          timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll `ready()` until true; ClusterError with the node's output when a node exits."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        for node in state.nodes:
            if not _is_ours(node):
                raise ClusterError(f"node {node.name} exited while waiting for {what}; its "
                                   f"output ({node.log}):\n{_tail(node.log)}")
        if time.monotonic() > deadline:
            logs = ", ".join(node.log for node in state.nodes)
            raise ClusterError(f"{what} not within {timeout_s:.0f} s; see {logs}")
        time.sleep(1.0)


def _check_not_running(state_dir: Path) -> None:
    old = State.load(state_dir)
    if old is not None and any(_is_ours(node) for node in old.nodes):
        raise ClusterError(f"a cluster started from {state_dir} is running (head {old.head}): "
                           "stop it first (`make cluster-down`)")


def _check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise ClusterError(f"{host}:{port} ({what}) is in use: pick another with "
                               f"--{what.replace(' ', '-')} (make: CLUSTER_PORT, "
                               "CLUSTER_DASHBOARD_PORT)")


def up(args: argparse.Namespace) -> State:
    """Start the head and `--nodes` - 1 workers on this host; wait until all are ALIVE."""
    state_dir = args.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    _check_not_running(state_dir)
    _check_port_free(args.host, args.port, "port")
    _check_port_free(args.host, args.dashboard_port, "dashboard port")
    token = cluster_token(state_dir, create=True)
    env = node_env(token, _ray())
    state = State(head=f"{args.host}:{args.port}",
                  dashboard=f"http://{args.host}:{args.dashboard_port}",
                  temp_root=str(_temp_root(state_dir)))
    cpus = ["--num-cpus", str(args.cpus_per_node)] if args.cpus_per_node else []
    node_ip = ["--node-ip-address", args.host]
    try:
        _start_node("head", ["--head", "--port", str(args.port), *node_ip, *cpus,
                             "--dashboard-host", args.host,
                             "--dashboard-port", str(args.dashboard_port),
                             "--ray-client-server-port", str(free_port())],
                    state, state_dir, env)
        _wait("the head", lambda: alive_nodes(state.dashboard, token) >= 1, state)
        for index in range(1, args.nodes):
            _start_node(f"worker-{index}", ["--address", state.head, *node_ip, *cpus],
                        state, state_dir, env)
        _wait(f"{args.nodes} ALIVE nodes",
              lambda: alive_nodes(state.dashboard, token) >= args.nodes, state)
    except BaseException:
        stop(state, state_dir)
        raise
    _write_private(state_dir / "cluster.env", env_lines(state, state_dir))
    return state


def join(args: argparse.Namespace) -> State:
    """Start one worker node on this host that joins the head at `args.head`."""
    state_dir = args.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    _check_not_running(state_dir)
    token = cluster_token(state_dir, create=False)
    state = State(head=args.head, dashboard=f"http://{args.head.rsplit(':', 1)[0]}:"
                  f"{args.dashboard_port}", temp_root=str(_temp_root(state_dir)))
    cpus = ["--num-cpus", str(args.cpus_per_node)] if args.cpus_per_node else []
    node_ip = ["--node-ip-address", args.host] if args.host else []
    try:
        node = _start_node("worker", ["--address", args.head, *node_ip, *cpus],
                           state, state_dir, node_env(token, _ray()))
        # The worker's log says when it joined; the head's dashboard may not be reachable here.
        _wait("the worker to join", lambda: "Ray runtime started" in _tail(node.log, 200),
              state)
    except BaseException:
        stop(state, state_dir)
        raise
    _write_private(state_dir / "cluster.env", env_lines(state, state_dir))
    return state


def stop(state: State, state_dir: Path) -> list[int]:
    """Stop the recorded nodes (workers first) and every process they left; returns the pids
    that could not be stopped (empty: all gone)."""
    live = [node for node in state.nodes if _is_ours(node)]
    started = cluster_processes([node.pid for node in live], state.temp_root)
    for node in reversed(live):  # workers first, then the head
        _stop_node(node)
    leftovers = set(started) | cluster_processes([], state.temp_root)
    for pid in _alive(leftovers):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(leftovers) and time.monotonic() < deadline:
        time.sleep(0.2)
    remaining = _alive(leftovers)
    if not remaining:
        shutil.rmtree(state.temp_root, ignore_errors=True)
        for name in ("cluster.json", "cluster.env"):
            (state_dir / name).unlink(missing_ok=True)
    return remaining


def down(args: argparse.Namespace) -> None:
    """`down`: stop what `up`/`join` started from this state dir, nothing else."""
    state = State.load(args.state_dir)
    if state is None:
        print(f"no cluster started from {args.state_dir}: nothing to stop")
        return
    running = [node.name for node in state.nodes if _is_ours(node)]
    remaining = stop(state, args.state_dir)
    if remaining:
        raise ClusterError(f"could not stop processes {remaining} of the cluster")
    print(f"stopped {', '.join(running) or 'nothing (the nodes had exited)'}; "
          f"no process of the cluster is left")


def _report(state: State, state_dir: Path, what: str, stop_with: str) -> None:
    env_file = state_dir / "cluster.env"
    print(f"""{what}
  head (GCS)   {state.head}
  dashboard    {state.dashboard}
  token        {state_dir / 'token'}
  node output  {state_dir / 'logs'}/

In every shell that uses the cluster:
  source {env_file}
then submit with `ray job submit --address "$CLUSTER_DASHBOARD" --working-dir . -- ...`.
Another host joins with (the token exported there first):
  python deploy/cluster.py join {state.head} --host <that host's address>
Stop: {stop_with}   (stops these nodes only)""")


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `deploy/cluster.py` command line."""
    parser = argparse.ArgumentParser(
        prog="deploy/cluster.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path(
        os.environ.get("CLUSTER_STATE_DIR") or DEFAULT_STATE_DIR),
        help="token, cluster.env, node list and output (default: $CLUSTER_STATE_DIR, else "
             ".ray_cluster/ of the repository)")
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("up", help="start a head and N-1 workers on this host")
    start.add_argument("--nodes", type=int, default=1, help="nodes on this host (default: 1)")
    start.add_argument("--host", default="127.0.0.1",
                       help="address the nodes and the dashboard use (default: 127.0.0.1, this "
                            "host only; a multi-host cluster needs an address the others reach)")
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help="GCS port (default: 6379)")
    start.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                       help="dashboard and job API port (default: 8265)")
    start.add_argument("--cpus-per-node", type=int, default=0,
                       help="CPUs each node offers (default: this host's CPUs / nodes)")
    start.set_defaults(handler=_up)

    add = commands.add_parser("join", help="start a worker here that joins HEAD (host:port)")
    add.add_argument("head", help="the head's GCS address, host:port")
    add.add_argument("--host", default="", help="this node's address (default: Ray's guess)")
    add.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                     help="the head's dashboard port, for cluster.env (default: 8265)")
    add.add_argument("--cpus-per-node", type=int, default=0,
                     help="CPUs this node offers (default: all of this host's)")
    add.set_defaults(handler=_join)

    commands.add_parser("env", help="print the lines to export").set_defaults(handler=_env)
    commands.add_parser("down", help="stop the nodes started from --state-dir").set_defaults(
        handler=down)
    return parser


def _up(args: argparse.Namespace) -> None:
    if args.nodes < 1:
        raise ClusterError(f"--nodes must be >= 1, got {args.nodes}")
    if not args.cpus_per_node and args.nodes > 1:
        args.cpus_per_node = max(1, (os.cpu_count() or 1) // args.nodes)  # share this host
    state = up(args)
    _report(state, args.state_dir,
            f"Ray cluster up: {args.nodes} node(s) on this host, token authentication.",
            "make cluster-down")


def _join(args: argparse.Namespace) -> None:
    _report(join(args), args.state_dir, f"worker node joined {args.head}.",
            "python deploy/cluster.py down")


def _env(args: argparse.Namespace) -> None:
    state = State.load(args.state_dir)
    if state is None or not any(_is_ours(node) for node in state.nodes):
        raise ClusterError(f"no cluster started from {args.state_dir}: run `make cluster-up`")
    print(env_lines(state, args.state_dir), end="")


def main(argv: list[str] | None = None) -> None:
    """Run one sub-command; a failure the user can fix is one line, exit code 1."""
    args = build_parser().parse_args(argv)
    args.state_dir = args.state_dir.resolve()
    try:
        args.handler(args)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
