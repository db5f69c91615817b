"""The node's process: arguments, signals, spinning and an orderly, bounded shutdown.

SIGINT and SIGTERM set a flag; the main thread spins the executor in short steps (a steady-clock timeout, so it
also wakes when use_sim_time is set and /clock has stopped), sees the flag within 0.2 s and then:
1. stops taking frames and takes the lifecycle `shutdown` transition (a mapping session is saved when
   save_map_on_cleanup is set, waiting only for the match of a frame in flight);
2. shuts the executor down without waiting for callbacks in flight, destroys the node and the context;
3. exits with os._exit after the logs are flushed: the interpreter's teardown with torch loaded took ~2 s on a
   loaded machine, and a frame or a query still being computed has nobody left to receive its answer.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback

import rclpy
import rclpy.logging

USAGE = """usage: fol-ros-node [--params-file FILE] [--ros-args ...]

Runs place_recognition_node (a ROS 2 lifecycle node; see docs/node.md).
  --params-file FILE   the node's parameters (e.g. config/fol_ros.yaml); applied first, so -p overrides win
  --ros-args ...       passed to rclpy: -p name:=value, -r image:=/camera/image_raw, -r __ns:=/robot, ...
  -h, --help           this text
SIGINT (Ctrl-C) and SIGTERM stop it within 2 s (a mapping session is saved first if save_map_on_cleanup)."""
SPIN_STEP_S = 0.2


def node_argv(args: list[str] | None) -> list[str] | None:
    """rclpy arguments from the command line (None: --help was asked for).

    `--params-file F` before any `--ros-args` becomes `--ros-args --params-file F` placed first, so `-p` overrides
    given after `--ros-args` win over the file.
    """
    argv = list(sys.argv if args is None else ['fol-ros-node', *args])
    end = argv.index('--ros-args') if '--ros-args' in argv else len(argv)
    if '-h' in argv[1:end] or '--help' in argv[1:end]:
        return None
    if '--params-file' in argv[:end]:
        i = argv.index('--params-file')
        path = argv[i + 1] if i + 1 < end else ''
        argv = [*argv[:i], *argv[i + 2:end], '--ros-args', '--params-file', path, '--', *argv[end:]]
    return argv


class StopFlag:
    """Set by SIGINT/SIGTERM (the Python handlers run in the main thread between spin steps)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ''

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if not self.event.is_set():
            self.signal_name = signal.Signals(signum).name
        self.event.set()


def spin_until_signal(node) -> str:
    """Spin a single-threaded helper node (recorder, pose graph) until SIGINT/SIGTERM or the context ends.

    For processes started with rclpy's own signal handling off, so that the caller can still write its results
    after the signal. Returns the signal's name ('' when the context ended).
    """
    stop = StopFlag()
    stop.install()
    while rclpy.ok() and not stop.event.is_set():
        rclpy.spin_once(node, timeout_sec=0.1)
    return stop.signal_name


def close_node(node) -> None:
    """Destroy `node` and shut the context down if nobody else did."""
    node.destroy_node()
    if rclpy.ok():
        rclpy.shutdown()


def run_node(node_class, args: list[str] | None = None) -> int:
    """Run `node_class()` on a MultiThreadedExecutor until SIGINT/SIGTERM or the context ends."""
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
    argv = node_argv(args)
    if argv is None:
        print(USAGE)
        return 0
    stop = StopFlag()
    stop.install()
    try:
        from rclpy.signals import SignalHandlerOptions
    except ImportError:  # an rclpy without the option: ours are installed again after its own
        rclpy.init(args=argv)
        stop.install()
    else:
        rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    root = logging.getLogger('fol_ros')
    root.setLevel(logging.INFO)
    from fol_ros.ros.resources import RclpyLogHandler
    root.addHandler(RclpyLogHandler(rclpy.logging.get_logger('fol_ros')))
    node = None
    executor = MultiThreadedExecutor(num_threads=4)
    try:
        node = node_class()
        executor.add_node(node)
        while not stop.event.is_set() and rclpy.ok():
            try:
                executor.spin_once(timeout_sec=SPIN_STEP_S)
            except ExternalShutdownException:
                break
            except Exception as exc:  # a failed callback must not end the node: log it and keep serving
                logger = node.get_logger()
                logger.error(f'callback failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}')
    except KeyboardInterrupt:  # a signal during start-up (model loading)
        pass
    stopping = time.monotonic()
    if node is not None:
        node.get_logger().info(f'{stop.signal_name or "context shut down"}: shutting down')
    clean = shutdown(node, executor)
    if node is not None:
        print(f'[fol_ros] stopped in {time.monotonic() - stopping:.2f} s'
              + ('' if clean else ' (leaving a computation in flight behind)'), flush=True)
    # Everything is saved and destroyed: leave without the interpreter's teardown, which took ~2 s with torch loaded
    # on a loaded machine, and never waits for a frame or query still computing in another thread.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shutdown(node, executor) -> bool:
    """Orderly shutdown; False when a computation is still running in some thread."""
    if node is not None:
        node.stop_processing()
        try:
            if node._state_machine.current_state[1] in ('unconfigured', 'inactive', 'active'):
                node.trigger_shutdown()
        except Exception as exc:  # already finalized, or a transition in progress
            node.get_logger().warning(f'shutdown transition: {type(exc).__name__}: {exc}')
    try:
        executor.shutdown(timeout_sec=0, wait_for_threads=False)
    except TypeError:  # Humble: no wait_for_threads
        executor.shutdown(timeout_sec=0)
    idle = True
    if node is not None:
        idle = node.worker.close(timeout=0.5)
        node.destroy_node()
    rclpy.try_shutdown()
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    deadline = time.monotonic() + 0.5
    for thread in busy:
        thread.join(max(0.0, deadline - time.monotonic()))
    return idle and not any(t.is_alive() for t in busy)
