"""The stop request in one process: signals are recorded, not acted on, and uninstall restores."""
import os
import signal

import pytest

from megamm.train.preemption import PREEMPTED_EXIT, Preempted, StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_is_recorded_and_agreed(sig):
    before = signal.getsignal(sig)
    stop = StopRequest.install()
    try:
        assert stop.agreed() == 0
        os.kill(os.getpid(), sig)  # handled at the next bytecode: the process keeps running
        assert stop.agreed() == sig and StopRequest.name(stop.agreed()) == sig.name
        other = signal.SIGUSR1 if sig == signal.SIGTERM else signal.SIGTERM
        stop._record(other, None)
        assert stop.received == sig  # the first signal is the one reported
        # once agreed, the process exits 75: further stop signals are ignored, also while Python shuts down
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) is before


def test_preempted_names_step_signal_checkpoint_and_status():
    msg = str(Preempted(7, "SIGTERM", "/runs/a/step7"))
    assert msg.startswith("stopped by SIGTERM after step 7 (checkpoint /runs/a/step7)")
    assert f"exit status {PREEMPTED_EXIT}" in msg and PREEMPTED_EXIT == 75
    assert "nothing saved" in str(Preempted(3, "SIGUSR1", None))
