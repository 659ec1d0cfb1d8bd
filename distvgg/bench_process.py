"""A loop of ``distvgg.bench`` in a process of its own, driven window by window from the bench's process:
Accelerate keeps one mixed precision per process, so loops of different precisions cannot share one."""

from __future__ import annotations

import contextlib
import multiprocessing
from typing import Any

import torch


class BenchError(RuntimeError):
    """A measured loop or run failed; the message says which and how."""


def serve(conn: Any, loop: Any, cfg: Any, threads: int, flags: Any = None) -> None:
    """A distvgg loop in a process of its own: built, then the parent's commands run one at a time, each answered with
    its result: ``("warm_up", n)``, ``("measure", n)``, ``("summary",)``; ``("close",)`` ends it. A failure, also of
    the setup, is answered with the exception."""
    from distvgg.bench import DistvggLoop  # here: bench imports this module

    torch.set_num_threads(threads)
    try:
        timed = DistvggLoop(loop, cfg, flags)
        for command, *arguments in iter(conn.recv, ("close",)):
            conn.send(("ok", getattr(timed, command)(*arguments)))
        timed.run.accelerator.end_training()
    except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
        conn.send(("error", e))


class RemoteLoop:
    """The parent's handle on a ``serve`` process: the same ``warm_up``, ``measure``, ``summary`` as a local loop."""

    def __init__(self, loop: Any, cfg: Any, flags: Any = None) -> None:
        # Forked from a server process that imported torch once and never started CUDA or Accelerate: no state
        # inherited, and no new interpreter per loop (importing torch takes seconds). Spawned where there is none.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if context.get_start_method() == "forkserver":
            context.set_forkserver_preload(["torch", "distvgg.train"])  # not bench: it may be __main__
        self.loop, self.windows, (self.conn, child) = loop, [], context.Pipe()
        self.process = context.Process(target=serve, args=(child, loop, cfg, torch.get_num_threads(), flags))
        self.process.start()  # it sets up while this process goes on; the first command waits for that

    def _call(self, *command: Any) -> Any:
        try:
            with contextlib.suppress(BrokenPipeError):  # a process whose setup failed has its answer waiting
                self.conn.send(command)
            status, value = self.conn.recv()
        except (EOFError, OSError):  # the process died (killed, out of memory): its output says why
            self.close()
            raise BenchError(f"{self.loop.name}'s process ended (exit code {self.process.exitcode})") from None
        if status == "error":
            self.close()
            raise value
        return value

    def warm_up(self, n: int) -> None:
        self._call("warm_up", n)

    def measure(self, steps: int) -> float:
        self.windows.append(self._call("measure", steps))
        return self.windows[-1]

    def summary(self) -> dict[str, Any]:
        return self._call("summary")

    def close(self) -> None:
        """Ends the process (again: a no-op)."""
        with contextlib.suppress(OSError):  # it has ended already
            self.conn.send(("close",))
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
