"""The console is raytron's: Ray's driver logging, Python warnings and the output Ray
forwards from its workers go to the run's log file while a training runs."""

import logging
import warnings

from raytron.platform.control.run_log import RAY_PRINTER, RunLog


def test_ray_logging_warnings_and_worker_output_go_to_the_log_file(tmp_path, capsys):
    import ray  # noqa: F401 (sets up Ray's "ray" logger and its console handler)
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    handlers = list(logging.getLogger("ray").handlers)
    printer = ray_worker.print_to_stdstream
    printed: list[dict] = []
    dispatcher.add_handler(RAY_PRINTER, printed.append)  # as ray.init does
    path = tmp_path / "raytron.log"
    try:
        with RunLog(path) as log:
            log.capture_workers()
            logging.getLogger("ray._private.authentication").warning(
                "Token authentication is enabled for this Ray cluster.")
            warnings.warn("Slicing a flattened dim from root mesh", FutureWarning,
                          stacklevel=1)
            dispatcher.emit({"pid": 4711, "actor_name": "TrainController", "is_err": True,
                             "lines": ["Started training worker group of size 1:"]})
            dispatcher.emit({"pid": 4712, "actor_name": "RayTrainWorker", "is_err": True,
                             "lines": ["raytron: rank 1 (pp=0, dp=1, tp=0): injected a kill "
                                       "at step 40"]})
            ray_worker.print_to_stdstream({  # as Ray's listener of raylet errors calls it
                "pid": "raylet", "is_err": False,
                "lines": ["A worker died or was killed while executing a task"]},
                ignore_prefix=False)
    finally:
        dispatcher.remove_handler(RAY_PRINTER)
    console = capsys.readouterr()
    assert console.out == "" and printed == []  # raytron's own worker line only:
    assert console.err == "raytron: rank 1 (pp=0, dp=1, tp=0): injected a kill at step 40\n"
    text = path.read_text()
    assert "WARNING ray._private.authentication: Token authentication is enabled" in text
    assert "FutureWarning: Slicing a flattened dim from root mesh" in text
    assert "(TrainController pid=4711, stderr) Started training worker group of size 1:" in text
    assert "(RayTrainWorker pid=4712, stderr) raytron: rank 1" in text
    assert "(raylet pid=raylet) A worker died or was killed while executing a task" in text
    assert logging.getLogger("ray").handlers == handlers  # Ray's own are back after it
    assert ray_worker.print_to_stdstream is printer
