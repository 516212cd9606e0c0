"""job/workarounds.py: each workaround still does what it says on the pinned TensorFlow and Ray,
and an unchecked version is refused."""

import json
import os
import subprocess
import sys
import time

import pytest

from job import workarounds
from tests.conftest import REPO, free_port


def python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_the_pinned_versions_are_the_checked_ones():
    workarounds.check_versions()


def test_an_unchecked_tensorflow_is_refused_loudly(monkeypatch):
    monkeypatch.setitem(workarounds.CHECKED, "tensorflow", "1.0.")
    with pytest.raises(RuntimeError, match=r"not tensorflow 2\.21\.\S+: re-check its workarounds"):
        workarounds.check_versions()


def test_mwms_per_device_input_stage_runs_without_autotune():
    # The per-device datasets MWMS builds internally are autotuned unless the workaround is
    # installed (their autotuner thread stalled iterator teardown): check both states.
    assert python(
        "import tensorflow as tf; from tensorflow.python.data.ops import multi_device_iterator_ops as m; "
        "from job.workarounds import per_device_datasets_without_autotune as fix\n"
        "def autotuned(): return m.OwnedMultiDeviceIterator(tf.data.Dataset.range(4), ['/cpu:0'])"
        "._device_iterators[0]._dataset.options().autotune.enabled is not False\n"  # unset = on
        "before = autotuned(); fix(); fix(); print(before, autotuned())") == "True False"


def test_tensorflows_native_start_up_lines_go_to_the_file(tmp_path):
    # Without the redirect TensorFlow's pre-InitializeLog lines reach stderr, whatever
    # TF_CPP_MIN_LOG_LEVEL says (on a machine without CUDA: "Could not find cuda drivers").
    log = tmp_path / "tf.log"
    out = subprocess.run(
        [sys.executable, "-c",
         "import os; from job.workarounds import native_stderr_to\n"
         f"with native_stderr_to({str(log)!r}):\n"
         "    import tensorflow as tf; tf.config.list_physical_devices(); os.write(2, b'inside\\n')\n"
         "os.write(2, b'after\\n')"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={"TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0
    assert out.stderr == "after\n"
    assert "inside" in log.read_text()


def test_a_worker_whose_peers_never_answer_fails_its_start_at_the_deadline():
    # Worker 1 of 2, whose leader (worker 0) is never there, as behind a cut link. Without the
    # workaround it waits TensorFlow's hour; with it (deadline 3 s here) MWMS() raises.
    code = ("import sys, tensorflow as tf; from job import workarounds\n"
            "workarounds.PEER_REGISTRATION_SECONDS = 3\n"
            "if sys.argv[1] == 'fixed': workarounds.bounded_peer_registration()\n"
            "try: tf.distribute.MultiWorkerMirroredStrategy()\n"
            "except tf.errors.DeadlineExceededError: print('deadline')\n")

    def worker_1_of_2(how: str) -> subprocess.Popen:  # each its own ports: both bind worker 1's
        cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                      "task": {"type": "worker", "index": 1}})}
        return subprocess.Popen([sys.executable, "-c", code, how], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    runs = {how: worker_1_of_2(how) for how in ("fixed", "default")}
    try:
        out, _ = runs["fixed"].communicate(timeout=120)
        assert out.strip() == "deadline"
        time.sleep(5)
        assert runs["default"].poll() is None  # still waiting for its peer
    finally:
        for run in runs.values():
            run.kill()
            run.communicate()
