"""The REPL worker's sandbox: what model code can reach, enforced by the kernel, no root needed.

Applied by the worker to itself before any model code runs (`enter`), in this order:

1. Namespaces. An unprivileged user namespace (the worker holds no capability over anything
   outside it, root included), a PID namespace and a mount namespace with a /proc of its
   own. The worker runs as PID 2 under a tiny init (PID 1) that reaps orphans and, when the
   worker exits, exits too: the kernel then kills every process left in the namespace, so a
   double-forked `setsid` daemon dies with the worker. The process the agent started stays
   outside, waits, and passes the worker's exit status on (the agent sees the same codes).
2. rlimits: processes (tasks of this user in the namespace: binds root too, since root in a
   user namespace lacks CAP_SYS_RESOURCE in the initial one), file size (writes to fd 2 go to
   a log file, so this caps them; SIGXFSZ is ignored so a write fails with EFBIG instead of
   killing the worker), open files, no core dumps. Hard limits, so code cannot raise them.
3. No new privileges, no capabilities (even those the user namespace gave).
4. Landlock: files read-only beneath the interpreter, its standard library and installed
   packages, the worker's own packages, the system's shared libraries and a few /etc files
   name resolution needs; read-write only beneath the worker's temporary directory; TCP
   connect only to the NATS server's ports; no TCP bind; no signals to, and no abstract unix
   sockets of, processes outside the sandbox.
5. seccomp: the syscalls an escape would use fail with EPERM (ptrace, process_vm_readv/writev,
   unshare/setns/mount and namespace flags on clone, bpf, perf_event_open, keyctl, io_uring,
   module loading, ...); sockets are TCP over IPv4/IPv6 only (no UDP, no raw, no unix or
   netlink sockets by socket(2)); clone3 says ENOSYS so libc falls back to clone, whose
   flags the filter can read.

A small ctypes layer rather than the `landlock` (a 1.0 pre-release) and `pyseccomp` (needs
libseccomp installed, unchanged since 2021) packages: the kernel interface is three
syscalls and one BPF program, and owning it keeps the worker free of a C library
dependency and lets the filter inspect clone and socket arguments exactly.

Linux x86_64 only; `support()` says why not elsewhere, and the host decides what to do.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import resource
import signal
import struct
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

Mode = str  # "on" | "off" | "auto"
MODES = ("on", "off", "auto")


class Policy(BaseModel):
    """What the worker may use once sandboxed; crosses to the worker in its config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workdir: str = Field(description="the only directory code may write (and read) in")
    ports: list[int] = Field(description="TCP ports code may connect to: the NATS server's")
    processes: int = Field(default=256, ge=8, description="tasks (threads count) at most")
    file_mb: int = Field(
        default=64, ge=1, description="largest file code may write (its log, fd 2, included)"
    )
    open_files: int = Field(default=1024, ge=64)
    read_only: list[str] = Field(
        default_factory=list, description="extra directories code may read (and execute)"
    )


# -- the raw kernel interface (x86_64) --------------------------------------------------------

_SYS_UNSHARE = 272
_SYS_CAPSET = 126
_SYS_SECCOMP = 317
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_NS_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECUREBITS = 28
_SECURE_NOROOT_LOCKED = 0b11  # uid 0 gains no capability by exec, for good
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

_UID_BASE = 0x7F000000
"""A worker started by root runs as this plus its init's pid: a uid no one else has."""

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18

# Landlock access rights, by the ABI version that introduced them.
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_ABI1 = (1 << 13) - 1  # execute .. make_sym
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2
_MIN_ABI = 4  # the first with network rules

_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class SandboxError(OSError):
    """The sandbox could not be set up; the worker must not run code unsandboxed."""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscall(nr: int, *args: object, what: str) -> int:
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    wide = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    rc = libc.syscall(ctypes.c_long(nr), *wide)
    if rc < 0:
        e = ctypes.get_errno()
        raise SandboxError(e, f"{what}: {os.strerror(e)}")
    return rc


def _prctl(option: int, arg2: int = 0, *, what: str) -> None:
    libc = _libc()
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), zero, zero, zero) != 0:
        e = ctypes.get_errno()
        raise SandboxError(e, f"{what}: {os.strerror(e)}")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 without Landlock."""
    try:
        return _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, 1, what="landlock")
    except (SandboxError, OSError, AttributeError):
        return 0


# -- is it there? (host side) ---------------------------------------------------------------


_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
if libc.syscall(ctypes.c_long(272), ctypes.c_long(%d)) != 0:
    raise SystemExit(os.strerror(ctypes.get_errno()))
"""


@functools.cache
def support() -> str | None:
    """None if this machine can sandbox a worker; otherwise why not, in words for a user.

    Cached: asked once per process (user namespaces are tried in a throwaway child).
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return (
            f"the REPL sandbox needs Linux on x86_64 (this is {sys.platform} {platform.machine()})"
        )
    abi = landlock_abi()
    if abi < _MIN_ABI:
        why = "no Landlock" if abi == 0 else f"Landlock ABI {abi}"
        return (
            f"this kernel has {why}; the REPL sandbox needs ABI {_MIN_ABI} or later "
            "(Linux 6.7+, with landlock in the lsm= boot list)"
        )
    try:
        with open("/proc/self/status") as f:
            if not any(line.startswith("Seccomp:") for line in f):
                return "this kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)"
    except OSError as e:
        return f"cannot read /proc/self/status to check for seccomp: {e}"
    probe = subprocess.run(
        [sys.executable, "-S", "-c", _PROBE % (CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        return (
            f"unprivileged user namespaces are not available ({why}); check "
            "kernel.unprivileged_userns_clone, user.max_user_namespaces and AppArmor's "
            "kernel.apparmor_restrict_unprivileged_userns"
        )
    return None


# -- entering (worker side) -----------------------------------------------------------------


def enter(policy: Policy, *, reaper_name: str = "council-repl-init") -> dict[str, object]:
    """Sandbox this process before it runs any model code; what was applied.

    Must be called while the process has a single thread (Landlock binds the calling
    thread and the threads it starts afterwards). Returns only in the sandboxed worker:
    the process it was called in stays outside as the relay, and never returns.
    """
    applied: dict[str, object] = {}
    applied["proc"] = _namespaces()
    applied["uid"] = os.getuid()
    _rlimits(policy)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")
    applied["landlock_abi"] = _landlock(policy)
    _seccomp()
    applied["seccomp"] = True
    return applied


def _namespaces() -> str:
    uid, gid = os.getuid(), os.getgid()
    root = uid == 0
    # Root needs no user namespace to make the others, and would stay root in one: the
    # kernel exempts real uid 0 from RLIMIT_NPROC however it got there. The worker takes
    # a real uid of its own instead and keeps effective uid 0 without any capability
    # (below): it still reads the interpreter where only root may (/root/.pyenv), and
    # Landlock, not file modes, decides what it reaches.
    flags = CLONE_NEWPID | CLONE_NEWNS | (0 if root else CLONE_NEWUSER)
    _syscall(_SYS_UNSHARE, flags, what="unshare(user, pid, mount namespaces)")
    if not root:
        # Map our own ids only: inside, we are who we were; nobody else's files become ours.
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    status_r, status_w = os.pipe()
    init = os.fork()
    if init:
        _relay(init, status_r, status_w)  # never returns
    # PID 1 of the new namespace.
    os.close(status_r)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, what="PR_SET_PDEATHSIG")
    own_uid = _UID_BASE + int(os.readlink("/proc/self"))  # our pid outside: unique while we live
    proc = _mount_proc()
    worker = os.fork()
    if worker:
        _init(worker, status_w)  # never returns
    os.close(status_w)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, what="PR_SET_PDEATHSIG")
    if os.getppid() != 1:  # init died before prctl took hold
        os._exit(1)
    _drop_bounding_set()  # while we still may
    if root:
        _prctl(_PR_SET_SECUREBITS, _SECURE_NOROOT_LOCKED, what="PR_SET_SECUREBITS")
        os.setgroups([])
        os.setresuid(own_uid, 0, 0)
    _capset_none()
    return proc


def _mount_proc() -> str:
    """A /proc that shows only the namespace's processes; 'host' if it cannot be mounted
    (Landlock still keeps other processes' entries out of reach)."""
    libc = _libc()
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return "host"
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if libc.mount(b"proc", b"/proc", b"proc", flags, None) != 0:
        return "host"
    return "own"


def _quiet_stdio() -> None:
    """The relay and init keep no copy of the worker's pipes (EOF must mean the worker)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


def _relay(init: int, status_r: int, status_w: int) -> None:
    """Outside the namespace: wait for it to end, then end the same way the worker did."""
    os.close(status_w)
    _quiet_stdio()
    _, status = os.waitpid(init, 0)
    data = os.read(status_r, 4)
    if len(data) == 4:
        (status,) = struct.unpack("i", data)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _init(worker: int, status_w: int) -> None:
    """PID 1: reap whatever the code leaves behind; end with the worker, taking all with it."""
    _quiet_stdio()
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if pid == worker:
            os.write(status_w, struct.pack("i", status))
            os._exit(0)


def _rlimits(policy: Policy) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    size = policy.file_mb * 1024 * 1024
    for which, value in (
        (resource.RLIMIT_NPROC, policy.processes),
        (resource.RLIMIT_FSIZE, size),
        (resource.RLIMIT_NOFILE, policy.open_files),
        (resource.RLIMIT_CORE, 0),
    ):
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))


def _drop_bounding_set() -> None:
    for cap in range(64):
        try:
            _prctl(_PR_CAPBSET_DROP, cap, what="PR_CAPBSET_DROP")
        except SandboxError as e:
            if e.errno == errno.EINVAL:  # past the last capability this kernel knows
                break
            raise
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, what="PR_CAP_AMBIENT")


def _capset_none() -> None:
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    _syscall(_SYS_CAPSET, ctypes.byref(header), data, what="capset")


def read_only_paths(policy: Policy) -> list[str]:
    """Where code may read and execute: the interpreter, its libraries and packages."""
    import agents
    import channels

    paths = {
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(os.path.realpath(agents.__file__)),
        os.path.dirname(os.path.realpath(channels.__file__)),
        *policy.read_only,
    }
    repo = os.path.dirname(os.path.dirname(os.path.realpath(agents.__file__)))
    for entry in sys.path:
        # Installed packages, never a source tree on the path (the repo holds more than code).
        if entry and os.path.realpath(entry) != repo and _is_packages(entry):
            paths.add(entry)
    paths |= {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo"}
    paths |= {"/etc/ssl/certs", "/usr/share/ca-certificates", "/sys/devices/system/cpu"}
    return sorted(_existing(paths))


def _is_packages(entry: str) -> bool:
    p = Path(entry)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return (
        p.name.endswith(("-packages", ".zip"))
        or any(_beneath(entry, prefix) for prefix in prefixes)
        or p.suffix == ".egg"
    )


def _beneath(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


_READ_FILES = (
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
)


def _existing(paths: Iterable[str]) -> set[str]:
    return {p for p in paths if p and os.path.exists(p)}


def _landlock(policy: Policy) -> int:
    abi = landlock_abi()
    if abi < _MIN_ABI:
        raise SandboxError(errno.ENOSYS, f"Landlock ABI {abi} < {_MIN_ABI}")
    fs = _FS_ABI1
    if abi >= 2:
        fs |= _FS_REFER
    if abi >= 3:
        fs |= _FS_TRUNCATE
    if abi >= 5:
        fs |= _FS_IOCTL_DEV
    scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = _RulesetAttr(fs, _NET_BIND_TCP | _NET_CONNECT_TCP, scoped)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else 16
    ruleset = _syscall(
        _SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0, what="landlock ruleset"
    )
    try:

        def allow(path: str, rights: int) -> None:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                return
            try:
                if not os.path.isdir(path):
                    rights &= _FILE_RIGHTS
                rule = _PathBeneath(rights & fs, fd)
                _syscall(
                    _SYS_LANDLOCK_ADD_RULE,
                    ruleset,
                    _RULE_PATH_BENEATH,
                    ctypes.byref(rule),
                    0,
                    what=f"landlock rule for {path}",
                )
            finally:
                os.close(fd)

        for path in read_only_paths(policy):
            allow(path, _READ)
        for path in _READ_FILES:
            allow(path, _FS_READ_FILE)
        allow("/dev/null", _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV)
        allow("/proc/self", _FS_READ_FILE | _FS_READ_DIR)  # this process's own entry only
        allow(policy.workdir, fs)
        for port in sorted(set(policy.ports)):
            rule = _NetPort(_NET_CONNECT_TCP, port)
            _syscall(
                _SYS_LANDLOCK_ADD_RULE,
                ruleset,
                _RULE_NET_PORT,
                ctypes.byref(rule),
                0,
                what=f"landlock rule for port {port}",
            )
        _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0, what="landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


# -- seccomp --------------------------------------------------------------------------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_LD_W_ABS, _JEQ, _JGE, _JSET, _AND, _RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06

DENIED = {
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "pidfd_getfd": 438,
    "kcmp": 312,
    "process_madvise": 440,
    "unshare": 272,
    "setns": 308,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "open_by_handle_at": 304,
    "name_to_handle_at": 303,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "reboot": 169,
    "swapon": 167,
    "swapoff": 168,
    "syslog": 103,
    "acct": 163,
    "quotactl": 179,
    "settimeofday": 164,
    "clock_settime": 227,
    "clock_adjtime": 305,
    "adjtimex": 159,
    "iopl": 172,
    "ioperm": 173,
    "uselib": 134,
    "vhangup": 153,
    "lookup_dcookie": 212,
    "personality": 135,
}
_CLONE, _CLONE3, _SOCKET = 56, 435, 41
_AF_INET, _AF_INET6, _SOCK_STREAM, _IPPROTO_TCP = 2, 10, 1, 6


def _arg(i: int) -> int:
    """Offset of the low 32 bits of syscall argument i in struct seccomp_data."""
    return 16 + 8 * i


def filter_program() -> list[tuple[int, int, int, int]]:
    """The BPF program as (code, jt, jf, k), jumps resolved; one place to read the policy."""
    eperm = _RET_ERRNO | errno.EPERM
    prog: list[tuple[int, object, object, int]] = [
        (_LD_W_ABS, 0, 0, 4),  # arch
        (_JEQ, 1, 0, _AUDIT_ARCH_X86_64),
        (_RET, 0, 0, eperm),
        (_LD_W_ABS, 0, 0, 0),  # syscall number
        (_JGE, "deny", 0, _X32_BIT),
    ]
    for nr in sorted(DENIED.values()):
        prog.append((_JEQ, "deny", 0, nr))
    prog += [
        (_JEQ, 0, 1, _CLONE3),
        (_RET, 0, 0, _RET_ERRNO | errno.ENOSYS),
        (_JEQ, 0, "not_clone", _CLONE),
        (_LD_W_ABS, 0, 0, _arg(0)),
        (_JSET, "deny", "allow", _NS_FLAGS),
        ("not_clone", None, None, 0),
        (_JEQ, 0, "allow", _SOCKET),
        (_LD_W_ABS, 0, 0, _arg(0)),
        (_JEQ, "inet", 0, _AF_INET),
        (_JEQ, "inet", "deny", _AF_INET6),
        ("inet", None, None, 0),
        (_LD_W_ABS, 0, 0, _arg(1)),
        (_AND, 0, 0, 0xF),
        (_JEQ, 0, "deny", _SOCK_STREAM),
        (_LD_W_ABS, 0, 0, _arg(2)),
        (_JEQ, "allow", 0, 0),
        (_JEQ, "allow", "deny", _IPPROTO_TCP),
        ("allow", None, None, 0),
        (_RET, 0, 0, _RET_ALLOW),
        ("deny", None, None, 0),
        (_RET, 0, 0, eperm),
    ]
    # Resolve labels: a label row marks the position of the next real instruction.
    labels: dict[str, int] = {}
    real: list[tuple[int, object, object, int]] = []
    for row in prog:
        if isinstance(row[0], str):
            labels[row[0]] = len(real)
        else:
            real.append(row)  # type: ignore[arg-type]
    out = []
    for i, (code, jt, jf, k) in enumerate(real):

        def rel(target: object, i: int = i) -> int:
            if isinstance(target, str):
                offset = labels[target] - i - 1
                assert 0 <= offset < 256, target
                return offset
            return int(target)  # type: ignore[call-overload]

        out.append((code, rel(jt), rel(jf), k))
    return out


def _seccomp() -> None:
    program = filter_program()
    filters = (_SockFilter * len(program))(*(_SockFilter(*row) for row in program))
    fprog = _SockFprog(len(program), filters)
    seccomp_set_mode_filter, tsync = 1, 1
    _syscall(_SYS_SECCOMP, seccomp_set_mode_filter, tsync, ctypes.byref(fprog), what="seccomp")
