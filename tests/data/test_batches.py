"""BatchSource: both packings implement it, and row_len, step_metrics and tokens_per_step agree
with each loader's own layout (ChunkLoader's seq_len, DecomposeLoader's plan)."""

from kiln.data.batches import BatchSource
from kiln.data.decompose_loader import DecomposeLoader
from kiln.data.loader import ChunkLoader
from tests.data.test_data_loader import SEQ, corpus  # noqa: F401 (corpus is a fixture)
from tests.data.test_decompose_loader import T, _loaders, buckets  # noqa: F401 (buckets too)


def test_chunk_loader_is_a_batch_source(corpus):
    prefix, _ = corpus
    ld = ChunkLoader(prefix, SEQ, micro_batch=2, dp_rank=1, dp_size=2, seed=0, grad_accum=3)
    assert isinstance(ld, BatchSource) and not ChunkLoader.global_token_mean
    assert ld.tokens_per_step == 2 * 3 * 2 * SEQ  # micro_batch x grad_accum x ranks x seq_len
    for step in range(4):
        assert ld.row_len(step) == SEQ == ld.batch(step, 2)["input_ids"].shape[1]
        assert ld.step_metrics(step) == {}


def test_decompose_loader_is_a_batch_source(buckets):
    lds = _loaders(buckets, world=4, sp=2, sp_min_len=16)
    assert DecomposeLoader.global_token_mean
    assert all(isinstance(ld, BatchSource) and ld.tokens_per_step == T for ld in lds)
    seen = set()
    for step in range(lds[0].steps_per_epoch):
        p = lds[0].plan(step)
        want = {"data/bucket": p.bucket, "data/seq_len": 1 << p.bucket, "data/batch_size": p.rows,
                "data/sp": p.sp}
        for ld in lds:
            assert ld.row_len(step) == 1 << p.bucket == ld.batch(step)["input_ids"].shape[1]
            assert ld.step_metrics(step) == want
        assert want["data/batch_size"] * want["data/seq_len"] == T  # constant tokens per step
        seen.add((p.bucket, p.sp))
    assert len({k for k, _ in seen}) > 1 and {sp for _, sp in seen} == {False, True}  # steps vary


def test_a_source_needs_every_member():
    class NoMetrics:
        tokens_per_step, global_token_mean = 1, False

        def batch(self, step, micro=0):
            return {}

        def row_len(self, step):
            return 1

    assert not isinstance(NoMetrics(), BatchSource)
