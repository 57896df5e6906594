"""`python serve_on_gpus.py SOURCE`: serves SOURCE on a local Ray that declares 2 GPUs
(the machine need have none) as 3 replicas of 1 GPU each, and prints as JSON how Ray
placed them and what device a task given a GPU id picks. Run by tests/test_serve.py in
a process of its own: a process joins one Ray, and the tests' declares no GPUs."""

from __future__ import annotations

import json
import sys
import time

import ray
from ray import serve

from raytron.platform.serving.app import build_app
from raytron.platform.serving.gpus import replica_device

DECLARED_GPUS, REPLICAS, READY_S = 2, 3, 180


@ray.remote
def device_of_a_task() -> tuple[list, str]:
    return ray.get_gpu_ids(), replica_device()


def replica_states() -> dict[str, int]:
    application = serve.status().applications.get("raytron")
    deployment = application and application.deployments.get("ModelServer")
    return dict(deployment.replica_states) if deployment else {}


def main(source: str) -> None:
    ray.init(address="local", num_cpus=4, num_gpus=DECLARED_GPUS, include_dashboard=False,
             log_to_driver=False)
    with_gpu = ray.get(device_of_a_task.options(num_gpus=1).remote())
    without = ray.get(device_of_a_task.options(num_gpus=0).remote())
    serve.start(proxy_location="Disabled")
    serve.run_many([serve.RunTarget(build_app(source, "small", replicas=REPLICAS, num_gpus=1),
                                    name="raytron")], wait_for_applications_running=False)
    deadline = time.time() + READY_S
    while replica_states().get("RUNNING", 0) < DECLARED_GPUS and time.time() < deadline:
        time.sleep(0.5)
    replicas = [actor["State"] for actor in ray._private.state.actors().values()
                if actor["Name"].startswith("SERVE_REPLICA::raytron#ModelServer")]
    print(json.dumps({"task_with_a_gpu": with_gpu, "task_without": without,
                      "replica_states": replica_states(), "replica_actors": sorted(replicas),
                      "free": ray.available_resources()}))
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
