"""Supervised fine-tuning data: a prompt/response jsonl as fixed-length rows whose labels cover
the response only (for objective.meap.sft, MEAP's SFT variant).

Each line is one JSON object with a prompt and a response field (default "prompt" and
"response"). A row is prompt tokens + response tokens + EOT, cut to seq_len (the response end is
cut first; an example whose prompt alone fills the row is refused), right-padded with PAD.
labels[i] is the token at i + 1 where that token belongs to the response or is its EOT, else
-100: the loss never trains the prompt or the padding, and right padding under causal attention
is never seen by a real token. `SftBatches` serves the rows as a BatchSource, deterministic from
(seed, step) like ChunkLoader (epoch permutations, disjoint rank slices), so a resumed run sees
the batches of the uninterrupted one.
"""
import json
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

IGNORE_INDEX = -100


def read_sft_jsonl(path, prompt_field: str = "prompt", response_field: str = "response") -> list[tuple[str, str]]:
    """(prompt, response) of every non-empty line of the jsonl `path`; DataError names a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SFT file {path} does not exist: point it at a .jsonl of {prompt_field}/{response_field} lines")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not JSON ({e.msg}): each line must be one object") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in (prompt_field, response_field)):
            raise DataError(f"{path}:{n} lacks string fields {prompt_field!r} and {response_field!r}")
        if row[response_field].strip():
            pairs.append((row[prompt_field], row[response_field]))
    if not pairs:
        raise DataError(f"{path} holds no example with a non-empty {response_field!r}")
    return pairs


def encode_sft(pairs, tok, seq_len: int, eot: int, pad: int) -> dict[str, torch.Tensor]:
    """{"input_ids", "labels"} [N, seq_len] int64 rows of `pairs` (see the module doc)."""
    ids = torch.full((len(pairs), seq_len), pad, dtype=torch.long)
    labels = torch.full((len(pairs), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(pairs):
        p, r = tok.encode(prompt).ids, tok.encode(response).ids + [eot]
        if len(p) >= seq_len:
            raise DataError(f"SFT example {i}'s prompt is {len(p)} tokens, which fills data.seq_len={seq_len} "
                            "with no room for its response: raise data.seq_len or shorten the prompt")
        row = (p + r)[:seq_len + 1]  # the token after the last input is its label
        ids[i, :min(len(row), seq_len)] = torch.tensor(row[:seq_len])
        lab = torch.tensor(row[1:])
        lab[:len(p) - 1] = IGNORE_INDEX  # a label that is a prompt token
        labels[i, :len(lab)] = lab
    return {"input_ids": ids, "labels": labels}


class SftBatches:
    """Rows of an SFT file as a BatchSource (kiln.data.batches); the ranks hold different numbers
    of response labels, so the loss is one mean over every label of the step."""

    global_token_mean = True

    def __init__(self, rows: dict, micro_batch: int, dp_rank: int, dp_size: int, seed: int, grad_accum: int = 1):
        self.rows, self.micro_batch, self.grad_accum = rows, micro_batch, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.n, self.seq_len = rows["input_ids"].shape
        self.tokens_per_step = micro_batch * grad_accum * dp_size * self.seq_len

    def row_len(self, step: int) -> int:
        return self.seq_len

    def step_metrics(self, step: int) -> dict:
        return {}

    def indices(self, step: int, micro: int = 0) -> np.ndarray:
        """The example indices of this rank's micro-step: epoch permutations seeded by (seed, epoch)."""
        per_step = self.micro_batch * self.grad_accum * self.dp_size
        start = step * per_step + (self.dp_rank * self.grad_accum + micro) * self.micro_batch
        g = np.arange(start, start + self.micro_batch)
        epochs, within = g // self.n, g % self.n
        return np.array([np.random.default_rng([self.seed, int(e)]).permutation(self.n)[w]
                         for e, w in zip(epochs, within)])

    def batch(self, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(self.indices(step, micro))
        b = {k: v[idx].clone() for k, v in self.rows.items()}
        b["position_ids"] = torch.arange(self.seq_len).expand(len(idx), -1).clone()
        return b
