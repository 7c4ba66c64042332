"""Reading W&B's offline run files (run-<id>.wandb) back, as `wandb sync` would upload them.

The file is W&B's record log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
records, each with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle,
4 last) and a protobuf `Record`. wandb 0.31 ships no Python reader, so the tests carry this one.
"""
import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: Path):
    """The protobuf Records of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def history(run_dir: Path, run_id: str) -> list[dict]:
    """Every history row of every offline folder of `run_id` under run_dir/wandb, oldest folder
    first: what one `wandb sync` of those folders uploads."""
    rows = []
    for f in sorted((Path(run_dir) / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for rec in records(f):
            if rec.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                rows.append(row)
    return rows


def run_records(run_dir: Path, run_id: str) -> list:
    """The `run` records (id, config, tags, group) of every offline folder of `run_id`."""
    out = []
    for f in sorted((Path(run_dir) / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        out += [r.run for r in records(f) if r.WhichOneof("record_type") == "run"]
    return out
