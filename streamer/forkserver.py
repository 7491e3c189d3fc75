"""The workers' fork server: one process that has imported the worker's modules, of which every
worker is a fork (milliseconds, and the imported code's pages shared, not imported again).

`start` makes it a fork of the streamer's own process, taken when the supervisor is created:
before the streamer has a thread, an event loop, a socket or an open log, so that there is
nothing in it a fork could break (a program embedding the streamer: what it holds at that
moment is forked too, its descriptors closed in the fork, its objects frozen, see start).
Everything the streamer has imported by then (asyncio, zmq, orjson, click, aiohttp...) is then
shared by the streamer, the fork server and every worker instead of imported again by a fresh
interpreter (`--workers=5 --rate=10 --persistence`: 99.5 -> 92 MB PSS for the tree, see
docs/BENCHMARKS.md). It then runs multiprocessing's own fork server loop, so workers are
started, watched and reaped exactly as multiprocessing does it. Where that cannot be done (not
Linux, a thread already running, a fork that fails, or a Python whose multiprocessing fork
server differs from the one this was written against), multiprocessing starts the fork server
its own way, a new interpreter that imports this module (PRELOAD) and sets itself up the same
way at import.

A stop signal sent to the whole process group (`timeout`, systemd's default KillMode, `kill -TERM
-PGID`) reaches the fork server too. Were it to die, its children (the workers) would be killed
with it (they die with their parent, see worker.die_with_parent) before they had drained. So the
fork server blocks SIGTERM (it still exits when the streamer does: multiprocessing closes its
lifeline; SIGINT it already ignores).

Blocked, not ignored: a worker is forked with the fork server's signal mask, so a SIGTERM that
reaches a new worker before it has set up its handler stays pending instead of being lost (the
supervisor may begin a drain a moment after starting a worker), and is delivered the moment the
worker unblocks it (worker.Worker.run).

The fork server also runs without the cyclic garbage collector, as Python's gc documentation
advises for fork without exec: no collection leaves freed holes in the pages its imports fill,
and each worker, first thing, freezes what it inherited and turns the collector back on
(worker.main), so its collections never write to those pages and they stay shared (the tree of
`--workers=5 --rate=10 --persistence` measured 104 -> 99 MB PSS). The streamer freezes what it
has imported before the fork, for the same reason.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import os
import signal
import socket
import sys

# what the fork server imports: the worker's modules, and what unpickling a worker's arguments
# would otherwise import in every worker (0.6 MB each)
PRELOAD = [
    "streamer.forkserver",
    "streamer.worker",
    "streamer.workerproc",
    "streamer.destinations.zeromq",
    "uvloop",
    "multiprocessing.sharedctypes",
    "multiprocessing.popen_forkserver",
]
NAME = b"forkserver"  # its name in ps, top (/proc/PID/comm); its command line is the streamer's
_PR_SET_NAME = 15

# the multiprocessing fork server this was written against (Pythons 3.11-3.13): its state, and
# how its loop is called. 3.14 authenticates its clients: there the standard start is used
_SERVER_STATE = {"_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_inherited_fds", "_lock", "_preload_modules"}
_MAIN_PARAMETERS = ["listener_fd", "alive_r", "preload", "main_path", "sys_path"]


def _in_the_fork_server() -> bool:
    """True while multiprocessing's fork server loop imports this module (it is on the stack)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "forkserver.py")):
            return True
        frame = frame.f_back
    return False


def _become_the_fork_server() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    gc.disable()


if _in_the_fork_server():  # multiprocessing started it: a new interpreter importing this module
    _become_the_fork_server()


def start() -> bool:
    """Fork this process into multiprocessing's fork server, if it can be done safely; False when
    not (multiprocessing then starts its own when the first worker is started)."""
    from multiprocessing import connection, forkserver, util

    server = forkserver._forkserver
    try:
        threads = len(os.listdir("/proc/self/task"))  # another thread: a fork copies only this one
    except OSError:  # no /proc: nothing tells the threads and descriptors
        return False
    if (
        threads != 1
        or set(vars(server)) != _SERVER_STATE
        or list(inspect.signature(forkserver.main).parameters) != _MAIN_PARAMETERS
        or server._forkserver_pid is not None
    ):
        return False
    # as multiprocessing does it: a socket only we can connect to; a pipe whose other end all our
    # processes hold, so that the fork server ends when the last of them is gone
    listener = socket.socket(socket.AF_UNIX)
    alive = None
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # the child is born with them blocked
    try:
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive = os.pipe()
        gc.freeze()  # our collections then never write to what the fork shares
        pid = os.fork()
        if pid == 0:
            _serve(listener.fileno(), alive[0], server._preload_modules)  # never returns
    except OSError:  # no process to be had (a pids limit) or no socket: multiprocessing's own way
        gc.unfreeze()
        if alive is not None:
            os.close(alive[1])
        return False
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        listener.close()
        if alive is not None:
            os.close(alive[0])
    server._forkserver_address = address
    server._forkserver_alive_fd = alive[1]
    server._forkserver_pid = pid
    return True


def set_name(name: bytes) -> None:
    """This process's name in ps and top (/proc/PID/comm, 15 bytes at most)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]))
    except (OSError, AttributeError):
        pass


def _serve(listener_fd: int, alive_r: int, preload: list[str]) -> None:
    """The fork server's life, in the forked child: keep only its two descriptors and standard
    input and output, set up as above, and run multiprocessing's fork server loop until the
    streamer and every worker are gone."""
    code = 0
    try:
        keep = {0, 1, 2, listener_fd, alive_r}
        for fd in [int(fd) for fd in os.listdir("/proc/self/fd")]:
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:  # the directory listing's own descriptor, closed already
                    pass
        devnull = os.open(os.devnull, os.O_RDONLY)  # the streamer's standard input is not its to hold
        os.dup2(devnull, 0)
        os.close(devnull)
        _become_the_fork_server()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the streamer decides
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        set_name(NAME)
        from multiprocessing import forkserver

        forkserver.main(listener_fd, alive_r, preload)
    except SystemExit as exc:  # the lifeline closed: the streamer and its workers are gone
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        code = 1
        sys.excepthook(*sys.exc_info())
        sys.stderr.flush()
    finally:
        os._exit(code)
