"""Confine this process, then run an untrusted Python program (executed as a script; stdlib only).

    python -I -S _jail.py CONFIG_JSON       run CONFIG's program, confined
    python -I -S _jail.py --probe           print which mechanisms this machine grants, as JSON

CONFIG: {"workdir", "program", "python", "uid", "memory_mb", "cpu_s", "processes", "file_bytes",
"disk_mb", "network", "mechanisms": [...]}. The jail sets the resource limits, enters new mount, IPC, PID
and network namespaces (as root; otherwise inside a new user namespace), mounts a size-limited tmpfs over
the work directory, drops to an unprivileged uid of its own, and forks the program
as the namespace's first process, which adds a Landlock domain (writes only beneath workdir, no TCP, no
signals or abstract sockets outside the domain) before exec. The jail waits and exits with the
program's status (128 + signal when it was killed). A mechanism CONFIG names that fails is fatal (125):
the parent asked for exactly what the probe found available.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import struct
import sys
import tempfile

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWIPC = (
    0x00020000, 0x10000000, 0x20000000, 0x40000000, 0x08000000,
)  # fmt: skip
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE, MNT_DETACH = 2, 4, 1 << 14, 1 << 18, 2
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 1, 8, 38, 47, 2
CAP_DAC_READ_SEARCH, CAPABILITY_VERSION_3 = 2, 0x20080522
# Landlock (uapi/linux/landlock.h); the syscall numbers are the same on x86_64 and the generic table (arm64)
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
RULESET_VERSION, RULE_PATH_BENEATH = 1 << 0, 1
FS_WRITE_FILE, FS_REMOVE_DIR, FS_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
FS_MAKE_ALL = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def set_limits(cfg: dict) -> None:
    limits = {
        resource.RLIMIT_AS: cfg["memory_mb"] << 20,
        resource.RLIMIT_CPU: cfg["cpu_s"],
        resource.RLIMIT_NPROC: cfg["processes"],
        resource.RLIMIT_FSIZE: cfg["file_bytes"],
        resource.RLIMIT_CORE: 0,
    }
    for key, value in limits.items():
        resource.setrlimit(key, (value, value))


def enter_namespaces(as_root: bool, network: bool = False) -> None:
    """Mount, IPC, PID and (unless `network`) network namespaces (only a down loopback in it); inside a
    new user namespace when not root, or when root lacks CAP_SYS_ADMIN (a container)."""
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | (0 if network else CLONE_NEWNET)
    if as_root and _libc.unshare(flags) == 0:
        return
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare")
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def mount_workdir(workdir: str, disk_mb: int, owner: int) -> None:
    """A size-limited tmpfs over the work directory, seen by this mount namespace only."""
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount(private /)")
    options = f"size={disk_mb}m,mode=0700,uid={owner},gid={owner}".encode()
    _check(_libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), "mount(tmpfs)")


def drop_to(uid: int) -> None:
    """Become `uid`, keeping only CAP_DAC_READ_SEARCH (ambient, so the program has it too): the Python
    interpreter may live where only root can read (e.g. under /root), and reads are not confined anyway."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(KEEPCAPS)")
    os.setresuid(uid, uid, uid)
    bit = 1 << CAP_DAC_READ_SEARCH
    header = struct.pack("=Ii", CAPABILITY_VERSION_3, 0)
    data = struct.pack("=6I", bit, bit, bit, 0, 0, 0)  # effective, permitted, inheritable (x2 words)
    _check(_libc.capset(header, data), "capset")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0), "prctl(AMBIENT)")


def landlock_abi() -> int:
    return max(_libc.syscall(SYS_CREATE_RULESET, None, 0, RULESET_VERSION), 0)


def landlock(workdir: str, mechanisms: set[str]) -> None:
    abi = landlock_abi()
    fs = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_ALL
    fs |= (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    if "landlock-fs" not in mechanisms:
        fs = 0
    net = NET_BIND_TCP | NET_CONNECT_TCP if "landlock-net" in mechanisms else 0
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if "landlock-scope" in mechanisms else 0
    attr = struct.pack("=QQQ", fs, net, scoped)
    size = 24 if scoped else 16 if net else 8
    ruleset = _check(_libc.syscall(SYS_CREATE_RULESET, attr, size, 0), "landlock_create_ruleset")
    for path, access in ((workdir, fs), ("/dev/null", FS_WRITE_FILE | (fs & FS_TRUNCATE))):
        if not fs:
            break
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", access, fd)
        _check(_libc.syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, 0), f"landlock_add_rule {path}")
        os.close(fd)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(_libc.syscall(SYS_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)


def exec_program(cfg: dict, mechanisms: set[str]) -> None:
    """The namespace's first process: die with the jail, confine the file system, become the program."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    if mechanisms & {"landlock-fs", "landlock-net", "landlock-scope"}:
        landlock(cfg["workdir"], mechanisms)
    os.chdir(cfg["workdir"])
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": cfg["workdir"], "TMPDIR": cfg["workdir"]}
    os.execve(cfg["python"], [cfg["python"], "-I", "-B", cfg["program"]], env)


def wait_status(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        return os.waitstatus_to_exitcode(status) if status else 0


def main(cfg: dict) -> int:
    mechanisms = set(cfg["mechanisms"])
    as_root = os.geteuid() == 0
    if "rlimits" in mechanisms:
        set_limits(cfg)
    if "namespaces" in mechanisms:
        enter_namespaces(as_root, cfg["network"])
        mount_workdir(cfg["workdir"], cfg["disk_mb"], cfg["uid"] if "uid" in mechanisms else os.getuid())
    if "uid" in mechanisms:
        drop_to(cfg["uid"])
    # credentials changed: ask again to die with the parent (the kernel clears it on setuid)
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    pid = os.fork()
    if pid == 0:
        try:
            exec_program(cfg, mechanisms)
        except BaseException as exc:  # noqa: BLE001 - the child must never return into the jail
            print(f"sandbox: cannot start the program: {exc}", file=sys.stderr, flush=True)
        os._exit(125)
    code = wait_status(pid)
    return 128 - code if code < 0 else code


def _in_child(step) -> str | None:  # noqa: ANN001
    """Run `step` in a forked child (its changes die with it): None if it worked, else why not."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            step()
            message = b""
        except OSError as exc:
            message = (exc.strerror or str(exc)).encode()
        os.write(write, message[:500])
        os._exit(0)
    os.close(write)
    message = os.read(read, 1000).decode(errors="replace")
    os.close(read)
    os.waitpid(pid, 0)
    return message or None


def _probe_namespaces(as_root: bool, folder: str) -> None:
    enter_namespaces(as_root)
    mount_workdir(folder, 1, os.getuid())


def probe() -> dict[str, str | None]:
    """Each mechanism -> None when it works here, or why not: each is tried for real in a child."""
    as_root = os.geteuid() == 0
    folder = tempfile.mkdtemp(prefix="sefusion-probe-")
    try:
        result = {"rlimits": None, "namespaces": _in_child(lambda: _probe_namespaces(as_root, folder))}
        with_ns = result["namespaces"] is None

        def become_nobody() -> None:  # after the namespaces, as the jail does
            _probe_namespaces(as_root, folder) if with_ns else None
            drop_to(65534)

        result["uid"] = _in_child(become_nobody) if as_root else "not root: runs as the calling user"
        abi = landlock_abi()
        for name, needs in (("landlock-fs", 1), ("landlock-net", 4), ("landlock-scope", 6)):
            low = f"Landlock ABI {abi} < {needs}" if abi else "Landlock unavailable in this kernel"
            result[name] = low if abi < needs else _in_child(lambda n=name: landlock(folder, {n}))
    finally:
        os.rmdir(folder)
    return result


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        print(json.dumps(probe()))
        sys.exit(0)
    try:
        sys.exit(main(json.loads(sys.argv[1])))
    except OSError as exc:
        print(f"sandbox: cannot confine the program: {exc}", file=sys.stderr, flush=True)
        sys.exit(125)
