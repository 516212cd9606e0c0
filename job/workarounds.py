"""Workarounds for the TensorFlow and Ray versions the job pins, each with the cause it avoids.

Each reaches into code that may change in another release, so `check_versions` refuses any
version they were not checked against: re-check them there (tests/test_workarounds.py shows
whether each is still needed and still works), then extend CHECKED.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

CHECKED = {"tensorflow": "2.21.", "ray": "2.60."}  # version prefixes


def check_versions() -> None:
    import ray
    import tensorflow as tf

    found = {"tensorflow": tf.__version__, "ray": ray.__version__}
    unchecked = [f"{name} {found[name]}" for name, prefix in CHECKED.items()
                 if not found[name].startswith(prefix)]
    if unchecked:
        raise RuntimeError(f"job/workarounds.py was checked against {CHECKED}, not "
                           f"{', '.join(unchecked)}: re-check its workarounds, then update CHECKED")


@contextlib.contextmanager
def native_stderr_to(path: str):
    """Send what native code writes to stderr (fd 2) to `path` while the block runs.

    Cause: TensorFlow's C++ start-up lines ("All log messages before absl::InitializeLog() is
    called...", "Could not find cuda drivers", "failed call to cuInit") are written before absl
    logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot hide them (abseil-cpp PRs 1718, 1957,
    unmerged). Python exceptions are unaffected: they propagate and print after the block.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def cluster_errors_to(path: str) -> None:
    """Send the cluster's error messages, which Ray prints into every driver's console, to `path`.

    Cause: a Ray driver prints whatever the GCS publishes as an error (listen_error_messages in
    ray/_private/worker.py), `log_to_driver=False` or not: a lost node alone brings ~45 lines of
    raylet internals ("(raylet) The node ... has been marked dead", "Raylet is terminated ...
    [state-dump] ..."). The job describes each failure itself (job/health.py); the raylets'
    own logs keep theirs. Call before ray.init.
    """
    import ray._private.worker as ray_worker

    def to_file(data, ignore_prefix):
        with open(path, "a") as log:
            ray_worker.print_worker_logs(data, log, ignore_prefix)

    ray_worker.print_to_stdstream = to_file


def keep_collectives_on_loopback() -> None:
    """Point TF_CONFIG at 127.0.0.1 when this Ray node lives on loopback.

    Cause: Ray Train builds TF_CONFIG from `ray.util.get_node_ip_address()` (the machine's
    default-route address; ray/train/_internal/utils.py, get_address_and_port), not from the
    address the node registered with. A node registered as 127.0.0.1 (local and test clusters)
    is reachable from this machine only, so all its peers are here too: keep their collectives on
    loopback.
    """
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node_ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
    if node_ip != "127.0.0.1":
        return
    tf_config = json.loads(os.environ["TF_CONFIG"])
    workers = tf_config["cluster"]["worker"]
    tf_config["cluster"]["worker"] = [f"127.0.0.1:{w.rsplit(':', 1)[1]}" for w in workers]
    os.environ["TF_CONFIG"] = json.dumps(tf_config)


# How long a (re)started worker group's workers wait to reach each other before the start fails.
# Workers of one group start together: their TensorFlow set-up differs by seconds, not minutes.
PEER_REGISTRATION_SECONDS = 90


def bounded_peer_registration() -> None:
    """Give the workers' first contact a deadline: PEER_REGISTRATION_SECONDS instead of an hour.

    Cause: MWMS starts TensorFlow's coordination service with the default register timeout
    (kDefaultClusterRegisterTimeout, 1 hour, in xla/tsl coordination_service_agent.cc), and its
    heartbeats only watch workers that have registered. A group restarted onto two hosts whose
    link is cut (Ray does not know the link is down) so waited an hour without a line; with a
    deadline its start fails and Ray Train counts it against --max-failures like any failure.
    MWMS keeps a coordination service configured before it (collective_all_reduce_strategy.py):
    this one is MWMS's own plus the deadline. Call before MultiWorkerMirroredStrategy().
    """
    import tensorflow as tf
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    if not cluster.jobs or context.context().coordination_service is not None:
        return
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=job,
                                                                 num_tasks=cluster.num_tasks(job))
                          for job in ("chief", "worker") if job in cluster.jobs],
        cluster_register_timeout_in_ms=PEER_REGISTRATION_SECONDS * 1000)


def per_device_datasets_without_autotune() -> None:
    """Turn tf.data autotuning off for MWMS's per-device input stage.

    Cause (seen here with gdb; no upstream report found): MWMS feeds each replica through a
    MultiDeviceIterator whose per-device datasets are built inside TensorFlow
    (multi_device_iterator_ops._create_device_dataset) with default options, so autotuning runs
    on them. Destroying such an iterator (end of fit, end of each validation pass) joins its
    autotuner thread, which was seen still sleeping out its optimisation period - up to 60 s -
    after cancellation. The per-device stage only forwards batches: nothing to tune.
    """
    import tensorflow as tf
    from tensorflow.python.data.ops import multi_device_iterator_ops as mdi

    create = mdi._create_device_dataset
    if getattr(create, "autotune_off", False):
        return
    options = tf.data.Options()
    options.autotune.enabled = False

    def create_without_autotune(*args, **kwargs):
        return create(*args, **kwargs).with_options(options)

    create_without_autotune.autotune_off = True
    mdi._create_device_dataset = create_without_autotune


def apply_in_worker() -> None:
    """All of the above that a training worker needs, after checking the versions."""
    check_versions()
    keep_collectives_on_loopback()
    bounded_peer_registration()
    per_device_datasets_without_autotune()
