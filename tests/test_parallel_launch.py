"""The launcher: errors end the run with the failing rank's traceback, no process outlives run()."""
import multiprocessing
import os
import socket
import time

import pytest
from course.parallel import launch
from parallel_workers import fail_on, sleep_forever

def _no_children_left():
    return not multiprocessing.active_children()


def test_failing_rank_ends_run_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(launch.RankFailed) as err:
        launch.run(fail_on, 2, 1, "boom", timeout=60)
    assert err.value.rank == 1
    assert "RuntimeError: boom on rank 1" in str(err.value) and "Traceback" in str(err.value)
    assert time.monotonic() - start < 60  # rank 0 was blocked in a collective and got stopped
    assert _no_children_left()


def test_timeout_stops_every_rank():
    with pytest.raises(TimeoutError, match="timeout=8"):
        launch.run(sleep_forever, 2, timeout=8)
    assert _no_children_left()


def test_port_already_taken_is_refused_before_spawning():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"port={port} is already taken"):
            launch.run(fail_on, 2, 0, timeout=10, port=port)
    assert _no_children_left()


def test_bad_launch_arguments():
    with pytest.raises(ValueError, match="importable module"):
        launch.run(lambda: None, 2)
    with pytest.raises(ValueError, match="world_size"):
        launch.run(fail_on, 0)
    with pytest.raises(ValueError, match="port"):
        launch.run(fail_on, 2, port=70000)
    assert _no_children_left()
