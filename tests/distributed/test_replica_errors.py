"""A replica's error reaches the user as one line when it is a project error, and as a bug otherwise."""

from __future__ import annotations

import pytest

from conftest import smoke_dict
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.distributed.engine import ReplicaEngine
from ray_s2p.distributed.pool import REPLICA_METHODS
from ray_s2p.distributed.ray_pool import _remote_error, _root_cause
from ray_s2p.distributed.replica import LocalPool, ReplicaError


@pytest.mark.parametrize("where", ["start", "method"])
@pytest.mark.parametrize("error, expected", [(ConfigError("task.options.x: unknown. Fix: drop it"), ReplicaError),
                                             (ZeroDivisionError("division by zero"), RuntimeError)])
def test_a_project_error_inside_a_replica_is_a_replica_error_and_anything_else_a_bug(ray_session, where, error,
                                                                                      expected):
    class Refuses:  # defined here so that Ray ships it by value (workers cannot import a test module)
        def __init__(self, error: Exception | None) -> None:
            if error is not None:
                raise error

        def run(self, error: Exception) -> None:
            raise error

    ray = ray_session
    actor = ray.remote(Refuses).remote(error if where == "start" else None)
    with pytest.raises(ray.exceptions.RayError) as caught:
        ray.get(actor.run.remote(error), timeout=120)
    assert _root_cause(caught.value).endswith(f"{type(error).__name__}: {error}")  # the replica's own error
    assert _remote_error(caught.value) is expected
    ray.kill(actor)



def test_every_replica_method_the_driver_calls_is_an_engine_method_and_others_are_refused():
    assert all(callable(getattr(ReplicaEngine, m, None)) for m in REPLICA_METHODS)
    pool = LocalPool(RunConfig.from_dict(smoke_dict()))
    with pytest.raises(ValueError, match="'prob' is not a replica method; the pools call info, probe"):
        pool.call("prob", [()] * pool.size)
    assert pool.traffic.summary()["messages"] == 0  # refused before anything reached a replica
