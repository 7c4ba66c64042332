"""ExpertFlow's offloaded experts: the same outputs as the model with all experts resident,
bitwise on CPU at every cache size, with and without prefetch; the cache never holds more than
its slots; hits and misses are counted as defined; bad settings are refused."""
import pytest
import torch

from kiln.infer.expertflow.cache import ExpertCache
from kiln.infer.expertflow.offload import fast_tier_bytes, offload
from kiln.infer.expertflow.runtime import ExpertFlow
from kiln.infer.expertflow.store import ExpertStore
from kiln.infer.generate import generate
from tests.infer.conftest import VOCAB, copy_of, prompts, tiny


class Oracle:
    """A 'predictor' that names exactly the experts the real model picks (or a fixed wrong set)."""

    def __init__(self, model, wrong: bool = False):
        from kiln.infer.expertflow.predictor import PredictorConfig, record_routes

        self.model, self.wrong = model, wrong
        self.record = record_routes
        self.cfg = PredictorConfig(VOCAB, 2, 8, 2)

    def predict(self, ids, position_ids=None, doc_ids=None):
        batch = {"input_ids": ids, "position_ids": position_ids, "doc_ids": doc_ids}  # doc_ids part pads off
        _, routes = self.record(self.model, [batch])
        return (routes + 3) % 8 if self.wrong else routes


@pytest.mark.parametrize("slots", [1, 2, 3, 8])
def test_forward_and_greedy_decoding_equal_the_resident_model_bitwise(moe, tmp_path, slots):
    ids = torch.randint(0, VOCAB, (3, 17))
    with torch.no_grad():
        ref = moe(ids)
    ref_tokens = generate(moe, prompts(4), 10)
    store = ExpertStore(ExpertStore.write(moe, tmp_path / "e.safetensors"), "cpu")
    served = copy_of(moe)
    cache = ExpertCache(store, slots)
    offload(served, cache)
    with torch.no_grad():
        assert torch.equal(served(ids), ref)
    assert generate(served, prompts(4), 10) == ref_tokens
    assert cache.stats.misses > 0 and cache.stats.hits + cache.stats.misses == cache.stats.activated
    # the offloaded model holds no expert bank of its own: the fast tier is dense weights + slots
    assert all(b.mlp.experts.w1.is_meta for b in served.layers)
    assert fast_tier_bytes(served, cache) < fast_tier_bytes(moe, None) or slots == 8


@pytest.mark.parametrize("wrong", [False, True])
def test_prefetch_keeps_outputs_and_a_right_prediction_turns_misses_into_hits(moe, tmp_path, wrong):
    ref_tokens = generate(moe, prompts(3), 8)
    path = ExpertStore.write(moe, tmp_path / "e.safetensors")
    flow = ExpertFlow(copy_of(moe), ExpertCache(ExpertStore(path, "cpu"), 2 if wrong else 8), Oracle(moe, wrong))
    assert generate(flow.model, prompts(3), 8, on_step=flow.before) == ref_tokens
    st = flow.cache.stats
    assert st.prefetched > 0 and st.tokens == sum(map(len, prompts(3))) + 3 * 7
    if wrong:   # prefetches of experts no token picked are evicted unused, and outputs stay exact
        assert st.prefetch_unused > 0 and st.misses > 0
    else:       # an exact oracle with room for all 8: nothing is ever loaded on demand
        assert st.misses == 0 and st.hits == st.activated


def test_the_cache_never_holds_more_than_its_slots(moe, tmp_path):
    store = ExpertStore(ExpertStore.write(moe, tmp_path / "e.safetensors"), "cpu")
    cache = ExpertCache(store, 2)
    seen = []
    load = cache.load

    def watched(layer, expert, keep):
        slot = load(layer, expert, keep)
        seen.append((len(cache.lru[layer]), slot))
        return slot
    cache.load = watched
    offload(moe, cache)
    generate(moe, prompts(4), 6)
    assert seen and max(n for n, _ in seen) <= 2 and {s for _, s in seen} <= {0, 1}
    # bytes moved are whole experts: w1, w3 [ffn, dim] and w2 [dim, ffn] in fp32
    assert cache.stats.bytes_moved == cache.stats.loads * 3 * 48 * 32 * 4


def test_hits_misses_and_lru_order_on_a_hand_built_sequence(moe, tmp_path):
    store = ExpertStore(ExpertStore.write(moe, tmp_path / "e.safetensors"), "cpu")
    cache = ExpertCache(store, 2)
    cache.load(0, 5, keep=set())
    cache.load(0, 6, keep=set())
    cache.slot(0, 5)                            # 5 used last: 6 is now least recent
    cache.load(0, 7, keep=set())
    assert cache.resident(0) == {5, 7}
    cache.load(0, 1, keep={5})                  # 7 is older than... 5 is kept, so 7 goes
    assert cache.resident(0) == {5, 1}
    for w in ("w1", "w3", "w2"):                # the slot holds exactly the stored expert
        assert torch.equal(cache.tensors[0][w][cache.lru[0][1]], getattr(moe.layers[0].mlp.experts, w)[1])
    with pytest.raises(RuntimeError, match="in use"):
        cache.load(0, 2, keep={5, 1})


def test_bad_settings_are_refused(tmp_path, moe):
    with pytest.raises(ValueError, match="no MoE layers"):
        ExpertStore.write(tiny(), tmp_path / "dense.safetensors")
    store = ExpertStore(ExpertStore.write(moe, tmp_path / "e.safetensors"), "cpu")
    for slots in (0, 9):
        with pytest.raises(ValueError, match="1 to 8 slots"):
            ExpertCache(store, slots)
    with pytest.raises(ValueError, match="2 MoE layers, the model 1"):
        offload(tiny("moe", every_n_layers=2), ExpertCache(store, 2))
