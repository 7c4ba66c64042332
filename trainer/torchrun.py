"""torchrun as `kiln train` starts it: `python -m kiln.trainer.torchrun <torchrun arguments>`.

The same launcher (torch.distributed.run), made to stop when `kiln train` dies (see
kiln.trainer.launch.die_with_parent) and to pass SIGTERM / SIGUSR1 on to the ranks
(kiln.trainer.launch.relay_stop_signals).
"""
import os
import runpy
import sys

from kiln.trainer.launch import die_with_parent, relay_stop_signals

if __name__ == "__main__":
    if "KILN_PARENT_PID" in os.environ:
        die_with_parent(int(os.environ.pop("KILN_PARENT_PID")))
    relay_stop_signals()
    sys.argv[0] = "torch.distributed.run"
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
    # every rank exited 0 (a failure raises above and ends as torchrun ends it): skip the
    # interpreter's teardown of torch, ~0.5 s of every run's end spent before `kiln train` can return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
