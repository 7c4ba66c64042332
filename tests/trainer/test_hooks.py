"""The hook protocol and the stage's checkpoint parts, in one process: events reach every hook in
order, metrics and console text merge, parts are collected, progress round-trips, old checkpoint
states load, and the MoE hook's auto re-solve runs as rank 0 runs it."""
import json

import pytest

from kiln.trainer.checkpoint import saved_state, upgrade_state
from kiln.trainer.hooks import Hook, Hooks
from kiln.trainer.stage import Progress


class Recorder(Hook):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def step_end(self, stage, step, seconds):
        self.log.append((self.name, "step_end", step))

    def eval_begin(self, stage):
        self.log.append((self.name, "eval_begin"))

    def metrics(self, stage, steps):
        return {f"{self.name}/steps": steps, "shared": self.name}

    def console(self, record):
        return f" | {self.name}"

    def state_dict(self):
        return {"seen": len(self.log)}


def test_hooks_call_every_hook_in_order_and_merge():
    log = []
    hooks = Hooks([Recorder("a", log), Hook(), Recorder("b", log)])
    hooks.step_end(None, 3, 0.1)
    hooks.eval_begin(None)
    hooks.after_resume(None, 0)  # the base hook's events are no-ops
    assert log == [("a", "step_end", 3), ("b", "step_end", 3), ("a", "eval_begin"), ("b", "eval_begin")]
    assert hooks.metrics(None, 5) == {"a/steps": 5, "b/steps": 5, "shared": "b"}  # later hooks win
    assert hooks.console({}) == " | a | b"
    parts = hooks.parts()
    assert list(parts) == ["a", "b"] and parts["a"].state_dict() == {"seen": 4}  # nameless: no part


def test_progress_round_trips_and_old_states_upgrade(tmp_path):
    p = Progress(stage=1, step=40, tokens=4096)
    q = Progress()
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert q == p
    old = {"step": 100, "tokens": 51200}  # what checkpoints held before the parts existed
    assert upgrade_state(old) == {"progress": old}
    assert upgrade_state({"progress": {"step": 1}}) == {"progress": {"step": 1}}
    q.load_state_dict(upgrade_state(old)["progress"])
    assert (q.stage, q.step, q.tokens) == (0, 100, 51200)
    run = tmp_path / "run"
    assert saved_state(run) is None
    tag = run / "checkpoints" / "step_00000100"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000100")
    (tag / "kiln_state.json").write_text(json.dumps(old))
    assert saved_state(run) == {"progress": old}


@pytest.mark.parametrize("ranks", [2, 8])
def test_auto_placement_solve_outcome(tmp_path, ranks):
    """The auto re-solve as rank 0 runs it (in a thread): a placement and placement_auto.json, or,
    for a request the ILP refuses (8 ranks, 4 experts), an error outcome that keeps training."""
    from types import SimpleNamespace

    from kiln.parallel.placement import check_placement, synthetic_profile
    from kiln.trainer.config import Recipe
    from kiln.trainer.hooks.moe import _Solve

    recipe = Recipe()
    recipe.parallel.placement_time_limit = 5.0
    run = SimpleNamespace(recipe=recipe, ep=ranks, bf16=False, run_dir=tmp_path)
    solve = _Solve(run, synthetic_profile(L=2, E=4, top_k=1, tokens=100, seed=0), step=6)
    kind, value, started, seconds = solve.outcome(wait=True)
    assert started == 6 and seconds >= 0
    if ranks == 2:
        assert kind == "ok"
        check_placement(value, 2, 4, 2)
        assert (tmp_path / "placement_auto.json").is_file()
    else:
        assert kind == "error" and "PlacementError" in value and "at most 4 ranks" in value
        assert not (tmp_path / "placement_auto.json").exists()


def test_auto_placement_takes_its_node_count_from_the_launch():
    from kiln.trainer.hooks.moe import ep_nodes

    assert ep_nodes(8, {"LOCAL_WORLD_SIZE": "4"}) == 2      # 8 expert ranks over nodes of 4
    assert ep_nodes(16, {"LOCAL_WORLD_SIZE": "4"}) == 4
    assert ep_nodes(8, {"LOCAL_WORLD_SIZE": "8"}) == 1      # the group fits in one node
    assert ep_nodes(6, {"LOCAL_WORLD_SIZE": "4"}) == 1      # not whole nodes: single-node model
    assert ep_nodes(4, {}) == 1 and ep_nodes(4, {"LOCAL_WORLD_SIZE": "x"}) == 1
