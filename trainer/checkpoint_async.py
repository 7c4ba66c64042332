"""checkpoint.async: DeepSpeed's files written by a background thread while training goes on.

DeepSpeed 0.19.8 has no background save that works on CPU with gloo (its "decoupled" engine
needs its own process group and GPU tensors, the fast engine DeepNVMe; torch's
distributed.checkpoint.async_save writes another format), so kiln defers the writes itself:
during `engine.save_checkpoint` a stand-in checkpoint engine takes each state dict DeepSpeed
hands it and keeps a copy of its tensors (the only blocking work: a memory copy, since training
then changes the originals in place); a thread of each rank then writes the copies with
DeepSpeed's own engine (same files, same format) and drops a marker file. Rank 0's thread waits
for every rank's marker, then publishes the checkpoint exactly as a blocking save does
(kiln.trainer.checkpoint.publish: manifest, `latest`, pruning). The thread uses no collective
(gloo would interleave it with training's), only the shared filesystem DeepSpeed already needs.

A kill before publication leaves `latest` on the previous checkpoint, as a blocking save does.
The next save, the last save of a stage and the process's exit wait for a pending one.
"""
import atexit
import threading
import time
from pathlib import Path

import torch.distributed as dist

_pending = {"thread": None, "error": None}
MARKER = ".kiln-saved-rank{}"


class _Deferred:
    """A stand-in for DeepSpeed's checkpoint engine that copies what it is given to save."""

    def __init__(self, real):
        self.real, self.writes = real, []

    def save(self, state_dict, path: str):
        from deepspeed.checkpoint.utils import clone_tensors_for_torch_save

        self.writes.append((path, clone_tensors_for_torch_save(state_dict)))

    def preserves_storage_sharing(self):
        return False  # our copies are compact: DeepSpeed need not clone slices of flat buffers itself

    def __getattr__(self, name):  # create, commit, makedirs, is_decoupled, ...: the real engine's
        return getattr(self.real, name)


def capture(engine, save_dir: str, tag: str, client_state: dict) -> list:
    """Run DeepSpeed's save_checkpoint (collective) with the writes deferred; the (path, state)
    pairs this rank must write."""
    real = engine.checkpoint_engine
    engine.checkpoint_engine = deferred = _Deferred(real)
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = real
    return [(path, state, real) for path, state in deferred.writes]


def start(writes: list, tag_dir: Path, publish, timeout_s: float) -> None:
    """Write `writes` in a background thread, then (rank 0) publish once every rank has written."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def work():
        try:
            for path, state, real in writes:
                real.save(state, path)
            writes.clear()  # the copies go as soon as they are on disk
            (tag_dir / MARKER.format(rank)).touch()
            if rank == 0:
                markers = [tag_dir / MARKER.format(r) for r in range(world)]
                deadline = time.monotonic() + timeout_s
                while not all(m.is_file() for m in markers):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"checkpoint {tag_dir}: not every rank wrote its files within "
                                           f"{timeout_s:.0f} s; `latest` stays on the previous checkpoint")
                    time.sleep(0.02)
                for m in markers:
                    m.unlink()
                publish()
        except BaseException as e:  # raised in the training thread by wait()
            _pending["error"] = e

    t = threading.Thread(target=work, name="kiln-checkpoint", daemon=True)
    _pending["thread"], _pending["error"] = t, None
    t.start()


def wait() -> None:
    """Block until the pending background save (if any) is written and published; re-raise its
    failure here, in the training thread."""
    t = _pending["thread"]
    if t is not None:
        t.join()
        _pending["thread"] = None
    if _pending["error"] is not None:
        e, _pending["error"] = _pending["error"], None
        raise e


def pending() -> bool:
    return _pending["thread"] is not None and _pending["thread"].is_alive()


@atexit.register
def _finish_at_exit():
    # a run stopped by a signal hook, or any exit after an async save: finish it, do not lose it
    t = _pending["thread"]
    if t is not None:
        t.join()
