"""A seccomp filter for run processes: the system calls a workflow never needs answer EPERM.

A denylist, written as a classic BPF program and installed with
``prctl(PR_SET_SECCOMP)``; it needs no library, only a kernel built with
seccomp filters (every mainstream one). What it takes away:

- the network: ``socket()`` of any family (a run talks to its worker over the
  socket it inherits, and reaches the outside only through ctx);
- other processes' memory and descriptors: ``ptrace``, ``process_vm_*``,
  ``pidfd_getfd``, ``kcmp``;
- new namespaces and mounts, whatever the run's privileges: ``unshare``,
  ``setns``, ``mount`` and its kin, ``clone`` with a ``CLONE_NEW*`` flag
  (``clone3``, whose flags a filter cannot read, says ENOSYS so that libc
  falls back to ``clone``);
- the kernel's wider attack surface: keyrings, ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``io_uring``, modules, ``kexec``, clocks, swap, reboot...

It is applied after ``PR_SET_NO_NEW_PRIVS``, so it survives ``execve`` and
cannot be lifted.
"""
from __future__ import annotations

import ctypes
import errno
import platform
import struct

from .linux import PR_SET_NO_NEW_PRIVS, libc

__all__ = ["DENIED", "available", "install", "program"]

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20       # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15          # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35          # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45         # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06          # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000

# Offsets in struct seccomp_data: nr, arch, instruction pointer, args (low word first on little endian).
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARG0 = 0, 4, 16

_CLONE_NEW_ANY = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_X32_BIT = 0x40000000

DENIED = (
    "socket", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "syslog", "acct", "quotactl", "vhangup", "personality",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
)

# Per architecture: its AUDIT_ARCH value and the numbers of the calls the filter looks at.
_ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {
        "socket": 41, "clone": 56, "ptrace": 101, "syslog": 103, "personality": 135, "vhangup": 153,
        "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166,
        "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171,
        "init_module": 175, "delete_module": 176, "quotactl": 179, "pivot_root": 155,
        "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
        "unshare": 272, "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
        "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
        "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "clone3": 435, "pidfd_getfd": 438, "mount_setattr": 442,
    }),
    "aarch64": (0xC00000B7, {
        "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51, "vhangup": 58, "quotactl": 60,
        "acct": 89, "personality": 92, "unshare": 97, "kexec_load": 104, "init_module": 105,
        "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117, "reboot": 142,
        "sethostname": 161, "setdomainname": 162, "settimeofday": 170, "adjtimex": 171, "socket": 198,
        "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220, "swapon": 224, "swapoff": 225,
        "perf_event_open": 241, "fanotify_init": 262, "name_to_handle_at": 264, "open_by_handle_at": 265,
        "clock_adjtime": 266, "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
        "finit_module": 273, "bpf": 280, "userfaultfd": 282, "kexec_file_load": 294,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
        "pidfd_getfd": 438, "mount_setattr": 442,
    }),
}


def available(machine: str | None = None) -> bool:
    """True when this architecture has a filter here."""
    return (machine or platform.machine()) in _ARCHES


def program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions, for ``machine`` (default: this one)."""
    audit_arch, numbers = _ARCHES[machine or platform.machine()]
    # Written with labels, then resolved: BPF jumps go forward only, counted from the next instruction.
    code: list[tuple[int, str | int, str | int, int]] = [
        (_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        (_JEQ_K, 1, 0, audit_arch),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),  # a foreign ABI (i386 on x86_64): its numbers mean other calls
        (_LD_W_ABS, 0, 0, _OFFSET_NR),
    ]
    if machine == "x86_64" or (machine is None and platform.machine() == "x86_64"):
        code.append((_JGE_K, "deny", 0, _X32_BIT))  # the x32 ABI: same calls under other numbers
    code += [(_JEQ_K, "deny", 0, nr) for nr in sorted({numbers[name] for name in DENIED})]
    code += [
        (_JEQ_K, "enosys", 0, numbers["clone3"]),
        (_JEQ_K, "clone", 0, numbers["clone"]),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    labels = {"clone": len(code)}
    code += [
        (_LD_W_ABS, 0, 0, _OFFSET_ARG0),
        (_JSET_K, "deny", 0, _CLONE_NEW_ANY),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    labels["deny"] = len(code)
    code.append((_RET_K, 0, 0, _RET_ERRNO | errno.EPERM))
    labels["enosys"] = len(code)
    code.append((_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS))
    resolved = []
    for index, (op, jt, jf, k) in enumerate(code):
        jt = labels[jt] - index - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - index - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise ValueError(f"a jump of instruction {index} does not fit in BPF's 8 bits")
        resolved.append((op, jt, jf, k))
    return resolved


def _pack(instructions: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(struct.pack("HBBI", *ins) for ins in instructions)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Apply the filter to this process (and everything it starts); raises OSError when it cannot."""
    code = _pack(program())
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _Fprog(len(code) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {errno.errorcode.get(err, err)}")
