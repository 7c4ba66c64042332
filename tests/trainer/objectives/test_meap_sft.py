"""MEAP's SFT variant on real prompt/response rows (kiln.data.sft): labels cover the response only,
the mask touches response inputs only at ratio 0.1 (binomial bounds), the masked copy is an extra
example with the same labels, the rows are served deterministically, and bad files are one line."""
import json
import math

import pytest
import torch

from kiln.data.errors import DataError
from kiln.data.sft import SftBatches, encode_sft, read_sft_jsonl
from kiln.data.tokenizer import load_tokenizer, special_ids, train_tokenizer, write_atomic
from kiln.model import ModelConfig, Transformer, flops_per_token
from kiln.trainer.objectives import MEAP, CausalLM

SEQ = 48


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    text = [f"question {i}: what is {i} plus {i}? answer: {2 * i} because adding twice" for i in range(200)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    write_atomic(path, train_tokenizer(text, 300).to_str().encode())
    return load_tokenizer(path)


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"question {i}: what is {i} plus {i}? answer:", "response": f" {2 * i} because adding twice"}
            for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def rows(tok, path):
    ids = special_ids(tok)
    return encode_sft(read_sft_jsonl(path), tok, SEQ, ids.eot, ids.pad), ids


def test_labels_cover_the_response_and_its_eot_only(tok, sft_file):
    r, ids = rows(tok, sft_file)
    pairs = read_sft_jsonl(sft_file)
    assert len(pairs) == 40 and r["input_ids"].shape == (40, SEQ)
    for i, (prompt, response) in enumerate(pairs):
        p, resp = tok.encode(prompt).ids, tok.encode(response).ids + [ids.eot]
        lab = r["labels"][i]
        want = resp  # the labels that are set, in order: the response tokens, then EOT
        assert lab[lab != -100].tolist() == want
        assert (lab[:len(p) - 1] == -100).all() and lab[len(p) - 1] == resp[0]
        assert r["input_ids"][i, :len(p) + len(resp)].tolist() == p + resp
        assert (r["input_ids"][i, len(p) + len(resp):] == ids.pad).all()  # right padding


def meap(sft=True, ratio=0.1, seed=3):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2))
    return MEAP(m, mask_id=1, sft=sft, sft_ratio=ratio, seed=seed)


def test_mask_touches_response_inputs_only_and_the_copy_is_an_extra_example(tok, sft_file):
    r, ids = rows(tok, sft_file)
    source = SftBatches(r, micro_batch=40, dp_rank=0, dp_size=1, seed=0)
    b = source.batch(0)
    obj = meap(ratio=0.1)
    out = obj.prepare_batch(b, step=2)
    n = len(b["labels"])
    assert out["input_ids"].shape[0] == 2 * n  # the originals, then their masked copies
    assert torch.equal(out["input_ids"][:n], b["input_ids"])
    for k in ("labels", "position_ids"):
        assert torch.equal(out[k][:n], b[k]) and torch.equal(out[k][n:], b[k])  # labels kept
    masked = out["input_ids"][n:] != b["input_ids"]
    assert (out["input_ids"][n:][masked] == 1).all()
    resp = torch.zeros_like(masked)
    resp[:, 1:] = b["labels"][:, :-1] != -100
    resp &= b["labels"] != -100
    assert not masked[~resp].any()  # never the prompt, the EOT's input or the padding
    k, m = int(masked.sum()), int(resp.sum())
    assert abs(k - 0.1 * m) < 5 * math.sqrt(m * 0.1 * 0.9), (k, m)
    assert obj.mask_rate == k / m
    again = meap(ratio=0.1).prepare_batch(b, step=2)  # (seed, step, rank): a resume redraws them
    assert torch.equal(again["input_ids"], out["input_ids"])
    assert not torch.equal(obj.prepare_batch(b, 3)["input_ids"], out["input_ids"])
    obj.train()
    loss, metrics = obj.loss(**out)  # CausalLM's loss over both copies' response labels
    assert torch.equal(loss, CausalLM(obj.model).loss(**out)[0]) and metrics["mask_rate"] == obj.mask_rate
    assert obj.flops_per_token(SEQ) == 2 * flops_per_token(obj.model.cfg, SEQ)
    assert meap(sft=False).flops_per_token(SEQ) == flops_per_token(obj.model.cfg, SEQ)


def test_sft_batches_are_deterministic_disjoint_per_rank_and_cover_an_epoch(tok, sft_file):
    r, _ = rows(tok, sft_file)
    ranks = [SftBatches(r, micro_batch=4, dp_rank=i, dp_size=2, seed=5, grad_accum=5) for i in range(2)]
    seen = [i for step in range(1) for src in ranks for micro in range(5) for i in src.indices(step, micro)]
    assert sorted(seen) == list(range(40))  # one step of 2 ranks x 5 micro x 4 rows = the epoch, once each
    again = SftBatches(r, micro_batch=4, dp_rank=1, dp_size=2, seed=5, grad_accum=5)
    assert torch.equal(again.batch(3, 2)["input_ids"], ranks[1].batch(3, 2)["input_ids"])
    assert ranks[0].tokens_per_step == 2 * 5 * 4 * SEQ and ranks[0].global_token_mean


def test_bad_sft_files_are_one_line(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    for text, message in (('{"prompt": "a"}', "bad.jsonl:1 lacks string fields"), ("nope", "bad.jsonl:1 is not JSON"),
                          ('{"prompt": "a", "response": " "}', "no example with a non-empty")):
        bad.write_text(text)
        with pytest.raises(DataError, match=message):
            read_sft_jsonl(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_sft_jsonl(tmp_path / "missing.jsonl")
    ids = special_ids(tok)
    with pytest.raises(DataError, match="fills data.seq_len=4"):
        encode_sft([("a long prompt of many words here", "x")], tok, 4, ids.eot, ids.pad)
