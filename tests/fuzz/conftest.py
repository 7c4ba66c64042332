"""The trainer tests' fixtures, and one short real run shared by the cases that need a trained
checkpoint (tests/fuzz/test_fuzz.py) and by the secrets search (tests/fuzz/test_secrets.py): it trains
with W&B offline and secret-looking variables planted in its environment."""
import uuid

import pytest

from tests.trainer.conftest import SMALL, kiln, kiln_home, small_recipe  # noqa: F401 - pytest fixtures

SECRET_NAMES = ["WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MY_SECRET", "DB_PASSWORD",
                "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "OPENAI_API_KEY", "KILN_TEST_PASSWORD_2"]


def planted() -> dict:
    """Secret-looking variables, each with its own marker value."""
    return {n: f"mk{uuid.uuid4().hex}" for n in SECRET_NAMES}


@pytest.fixture(scope="session")
def trained_run(kiln_home, tmp_path_factory):
    """(recipe path, run dir, planted markers, the run's CompletedProcess): 2 steps on 1 rank, a
    checkpoint at step 2, W&B offline, the markers in its environment."""
    tmp = tmp_path_factory.mktemp("trained")
    recipe = tmp / "small.yaml"
    recipe.write_text(SMALL.replace("CACHE", str(kiln_home / "cache")).replace("RUNS", str(tmp / "runs")))
    markers = planted()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in markers.items():
            mp.setenv(name, value)
        mp.setenv("WANDB_MODE", "offline")  # WANDB_API_KEY is set, and this machine has no network
        res = kiln("train", recipe, "--nproc", "1", "--set", "train.steps=2", "--set", "checkpoint.every=2",
                   "--set", "logging.wandb.mode=offline")
    return recipe, tmp / "runs" / "small", markers, res
