"""job/health.py on the driver: failures named from the errors workers really raise (texts
recorded on the hosts cluster, TF 2.21 / Ray 2.60), and the straggler rule."""

from job.health import StepTime, StragglerWatch, describe_failure

ADDRESSES = {0: "10.251.7.11", 1: "10.251.7.12"}
# Worker 1 frozen: worker 0's collective health check names it.
UNHEALTHY_1 = ("{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:worker/"
               "replica:0/task:0/device:CPU:0}} Collective ops is aborted by: Error reported from "
               "/job:worker/task:1: The following tasks are unhealthy (stopped sending heartbeats):\n"
               "/job:worker/replica:0/task:1\nThe tasks have crashed. Check the task logs for an "
               "earlier error, or scheduler events (e.g. preemption, eviction) to debug further.\n"
               "The error could be from a previous operation. Restart your program to reset. "
               "[Op:CollectiveReduceV2]")
# Worker 1 cannot reach worker 0, which runs the coordination service.
NO_COORDINATOR = ("{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:"
                  "worker/replica:0/task:1/device:CPU:0}} Collective ops is aborted by: Deadline "
                  "Exceeded\n\nRPC: /tensorflow.CoordinationService/Heartbeat\nThe error could be "
                  "from a previous operation. Restart your program to reset. [Op:CollectiveReduceV2]")
PROCESS_DIED = ("A worker health check failed.\nThe actor died unexpectedly before finishing this "
                "task.\nThe actor is dead because its worker process has died. Worker exit type: "
                "SYSTEM_ERROR")
PEER_RESET = ("Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
              "information from remote target /job:worker/replica:0/task:1 while calling "
              "/tensorflow.WorkerService/RecvBuf:\n\t [[{{node while/CollectiveReduceV2}}]]")
# Worker 1's first contact with worker 0 timed out (workarounds.bounded_peer_registration).
NEVER_REACHED = ("Deadline Exceeded\nAdditional GRPC error information from remote target /job:worker/"
                 "replica:0/task:0 while calling /tensorflow.CoordinationService/RegisterTask:\n"
                 ":UNKNOWN:Error received from peer  {grpc_status:4, grpc_message:\"Deadline Exceeded\"}")


def test_a_frozen_worker_is_the_one_its_peers_stopped_hearing():
    what, records = describe_failure({0: UNHEALTHY_1}, ADDRESSES)
    assert what == ("worker 1 on 10.251.7.12: stopped answering the all-reduce (no heartbeats "
                    "reached worker 0 on 10.251.7.11: it hung, or the link between them is cut)")
    assert records == [{"workers": [{"rank": 1, "address": "10.251.7.12"}],
                        "cause": what.split(": ", 1)[1]}]
    what, _ = describe_failure({1: NO_COORDINATOR}, ADDRESSES)  # worker 0 frozen
    assert what.startswith("worker 0 on 10.251.7.11: stopped answering the all-reduce")


def test_two_workers_that_blame_each_other_lost_the_link_between_them():
    what, _ = describe_failure({0: UNHEALTHY_1, 1: NO_COORDINATOR}, ADDRESSES)
    assert what.startswith("worker 0 on 10.251.7.11 and worker 1 on 10.251.7.12: lost contact")


def test_workers_that_never_reached_each_other_name_the_link_not_a_dead_process():
    what, _ = describe_failure({1: NEVER_REACHED}, ADDRESSES)
    assert what == ("worker 0 on 10.251.7.11 and worker 1 on 10.251.7.12: could not reach each other "
                    "when the group started (the link between them is cut, or worker 0 never came up)")


def test_a_dead_process_explains_its_peers_errors():
    what, _ = describe_failure({0: PEER_RESET, 1: PROCESS_DIED}, ADDRESSES)
    assert what == "worker 1 on 10.251.7.12: its process died (killed, or crashed: see its log)"


def test_an_unknown_error_keeps_its_last_line_and_an_unknown_address_shows():
    what, _ = describe_failure({1: "Traceback ...\nValueError: bad shape"}, {})
    assert what == "worker 1 on ?: failed: ValueError: bad shape"


def test_a_straggler_is_named_once_after_a_sustained_stretch():
    watch, lines = StragglerWatch(), []
    for ms in (100, 100, 100):  # worker 1 at 2x worker 0, three reports each
        lines += [watch.add(StepTime(0, 1, 50.0), "A"), watch.add(StepTime(1, 1, float(ms)), "B")]
    assert [line for line in lines if line] == [
        "straggler: worker 1 on B: 100 ms a step vs 50 ms (median of the others), epoch 1"]
    watch = StragglerWatch()  # 1.4x: within the rule, never named
    assert not any(watch.add(StepTime(r, 1, ms), "X") for _ in range(5)
                   for r, ms in ((0, 50.0), (1, 70.0)))


def test_an_error_that_names_its_worker_is_kept_as_it_is():
    gpu = "GpuUnavailable: worker 0 on node vm: Ray assigned GPU 0 but TensorFlow sees 0 GPU(s)"
    what, _ = describe_failure({0: gpu}, ADDRESSES)
    assert what == "worker 0 on node vm: Ray assigned GPU 0 but TensorFlow sees 0 GPU(s)"
