"""`agent chat` on a real terminal (a pseudo-terminal), the way a person uses it."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import bundles_plugin, install_plugin


def read_until(fd: int, needle: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"did not see {needle!r}; got {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            seen += chunk
    return seen


@pytest.fixture
def terminal_chat(plugin_site: Path, tiny_base: Path, tiny_bundles: dict[str, Path]):
    install_plugin(plugin_site, "hyperlex-tiny", "hx_tiny",
                   bundles_plugin(tiny_bundles["alpha"], tiny_bundles["beta"]))
    controller, child = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(plugin_site), "HYPERLEX_LOAD_PLUGINS": "hyperlex-tiny",
           "TERM": "dumb"}
    agent = Path(sys.executable).with_name("agent")
    process = subprocess.Popen([str(agent), "chat", "--base", str(tiny_base), "--persona", "alpha",
                                "-o", "max_new_tokens", "5"],
                               stdin=child, stdout=child, stderr=child, env=env,
                               start_new_session=True)
    os.close(child)
    yield process, controller
    if process.poll() is None:
        process.kill()
    process.wait()
    os.close(controller)


def test_interactive_chat_answers_switches_and_leaves_on_ctrl_d(terminal_chat) -> None:
    process, fd = terminal_chat
    read_until(fd, b"alpha> ")
    os.write(fd, b"hello\n")
    read_until(fd, b"[alpha]")
    read_until(fd, b"alpha> ")
    os.write(fd, b"/persona beta\n")
    read_until(fd, b"beta> ")
    os.write(fd, b"/persona ghost\n")
    assert b"unknown persona 'ghost'" in read_until(fd, b"beta> ")
    os.write(fd, b"\x04")  # Ctrl-D
    assert process.wait(timeout=30) == 0


def test_ctrl_c_at_the_prompt_keeps_the_chat_open(terminal_chat) -> None:
    process, fd = terminal_chat
    read_until(fd, b"alpha> ")
    time.sleep(0.5)  # a person's Ctrl-C comes after input() is waiting, not mid-setup
    os.killpg(process.pid, signal.SIGINT)
    read_until(fd, b"Ctrl-D or /exit")
    os.write(fd, b"/exit\n")
    assert process.wait(timeout=30) == 0
