"""The seccomp filter: its syscall numbers match the kernel's headers, and it denies what it says in a real process."""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import socket
import threading
from pathlib import Path

import pytest

from flowpool.sandbox import seccomp

HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}


@pytest.mark.parametrize("machine", sorted(HEADERS))
def test_syscall_numbers_match_the_kernel_headers(machine: str) -> None:
    header = HEADERS[machine]
    if not header.exists():
        pytest.skip(f"{header} is not installed")
    defined = {name: int(number) for name, number in
               re.findall(r"#define __NR_(\w+)\s+(\d+)\b", header.read_text())}
    numbers = seccomp._ARCHES[machine][1]
    wrong = {name: (nr, defined.get(name)) for name, nr in numbers.items() if defined.get(name) != nr}
    assert wrong == {}
    assert set(seccomp.DENIED) <= set(numbers)


@pytest.mark.parametrize("machine", sorted(HEADERS))
def test_program_jumps_stay_inside_the_program(machine: str) -> None:
    code = seccomp.program(machine)
    for index, (op, jt, jf, _) in enumerate(code):
        if op & 0x07 == 0x05:  # BPF_JMP
            assert index + 1 + max(jt, jf) < len(code)
    assert code[-1][0] == 0x06  # ends with a return


def _in_child(check) -> int:
    """Run ``check`` in a forked child under the filter; its exit code (0: passed)."""
    pid = os.fork()
    if pid == 0:
        try:
            seccomp.install()
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


needs_filter = pytest.mark.skipif(not seccomp.available(), reason=f"no filter for {platform.machine()}")


@needs_filter
def test_filtered_process_cannot_open_sockets_or_namespaces() -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def check() -> bool:
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            return False
        except PermissionError:
            pass
        if libc.unshare(0x00020000) == 0 or ctypes.get_errno() != errno.EPERM:
            return False
        # fork with no namespace flag is still fine; clone with one is not
        return libc.syscall(56 if platform.machine() == "x86_64" else 220, 0x20000000 | 17, 0, 0, 0, 0) == -1

    assert _in_child(check) == 0


@needs_filter
def test_filtered_process_still_forks_threads_and_pipes() -> None:
    def check() -> bool:
        done = []
        thread = threading.Thread(target=lambda: done.append(1))
        thread.start()
        thread.join()
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(w, b"k")
            os._exit(0)
        os.waitpid(child, 0)
        a, b = socket.socketpair()
        a.send(b"x")
        return done == [1] and os.read(r, 1) == b"k" and b.recv(1) == b"x"

    assert _in_child(check) == 0
