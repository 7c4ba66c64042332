"""The run's Weights & Biases log (rank 0): one W&B run per kiln run, across resumes.

W&B keeps a history row only when its step (`_step`) increases, and a resumed offline run starts
counting from 0 again: a redone step would be dropped, or overwrite an earlier row, when the
folders are synced. So kiln gives W&B its own increasing counter, kept in
<run_dir>/wandb_state.json after every row (and in each checkpoint), and plots every metric
against kiln's step (`define_metric(..., step_metric="step")`). A resumed run therefore continues
the same run id with rows numbered after the last one written before the crash; the redone steps
appear again under their kiln step, and `wandb sync` of all offline folders uploads one history.
Online, where the installed wandb has rewind (`resume_from`), the run is rewound to the
checkpoint's row instead, so the history holds each kiln step once.

A W&B failure never stops training: it warns once, and the metrics file goes on.
"""
import inspect
import json
import os
import secrets
from pathlib import Path

STATE_FILE, OLD_ID_FILE = "wandb_state.json", "wandb_id.txt"


class WandbLog:
    """W&B for one run directory; `log` is safe to call whatever happened to W&B."""

    def __init__(self, run_dir: Path, recipe, recipe_dict: dict, checkpoint_state: dict | None):
        self.run_dir, self.run, self.warned = Path(run_dir), None, False
        state = self._read_state()
        self.id, self.step = state["id"], state["step"]
        try:
            self.run = self._init(recipe, recipe_dict, checkpoint_state or {})
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
            self._write_state()
        except Exception as e:  # noqa: BLE001 - any W&B problem: warn, keep training
            self._fail(e)

    def _read_state(self) -> dict:
        try:
            state = json.loads((self.run_dir / STATE_FILE).read_text())
            return {"id": str(state["id"]), "step": int(state["step"])}
        except (OSError, ValueError, KeyError, TypeError):
            old = self.run_dir / OLD_ID_FILE  # run directories of earlier kiln versions
            run_id = old.read_text().strip() if old.is_file() else secrets.token_hex(4)
            return {"id": run_id, "step": -1}

    def _write_state(self) -> None:
        tmp = self.run_dir / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps({"id": self.id, "step": self.step}))
        os.replace(tmp, self.run_dir / STATE_FILE)

    def _init(self, recipe, recipe_dict: dict, saved: dict):
        import wandb

        w = recipe.logging.wandb
        mode = w.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            print("kiln: logging.wandb.mode=online but WANDB_API_KEY is not set; logging offline instead")
            mode = "offline"
        common = dict(project=w.project, entity=w.entity or None, group=w.group or None, tags=list(w.tags) or None,
                      name=recipe.train.name, mode=mode, dir=str(self.run_dir), config=recipe_dict,
                      settings=wandb.Settings(silent=True, console="off"))
        rewind_to = saved.get("step") if saved.get("id") == self.id else None
        if mode == "online" and rewind_to is not None and rewind_to >= 0 \
                and "resume_from" in inspect.signature(wandb.init).parameters:
            try:  # rewind (a W&B preview feature): the history continues from the checkpoint's row
                run = wandb.init(resume_from=f"{self.id}?_step={rewind_to}", **common)
                self.step = rewind_to
                return run
            except Exception as e:  # noqa: BLE001 - not enabled for this account: plain resume
                print(f"kiln: W&B rewind unavailable ({type(e).__name__}); continuing the run after its last row")
        return wandb.init(id=self.id, resume="allow", **common)

    def _fail(self, e: BaseException) -> None:
        if not self.warned:
            print(f"kiln: warning: W&B logging stopped ({type(e).__name__}: {str(e)[:200]}); "
                  f"metrics still go to the metrics file", flush=True)
        self.warned, self.run = True, None

    def log(self, values: dict, step: int) -> None:
        """One history row at kiln step `step`."""
        if self.run is None:
            return
        try:
            self.step += 1
            self.run.log({**values, "step": step}, step=self.step)
            self._write_state()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the run id and the W&B row counter at that checkpoint."""
        return {"id": self.id, "step": self.step}

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                self._fail(e)
