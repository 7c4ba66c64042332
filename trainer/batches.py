"""The batches of a stage: the recipe's packing as one BatchSource (kiln.data.batches), plus
the held-out batches and the rule that picks sequence parallelism per batch.

Decomposition (data.packing = decompose): each step is one bucket, tokens_per_step / 2^k rows of
2^k tokens (kiln.data.decompose_loader). Tokens per step are constant, so tokens seen =
step x tokens_per_step and the LR schedule's progress step / train.steps equals tokens seen /
total tokens: keying it to steps is keying it to tokens. Its ranks hold different numbers of
valid labels, so the loss of every rank is scaled by its token share over *all* ranks
(BatchSource.global_token_mean), whether a step's rows were split data-parallel or sharded
along the sequence.
"""
from kiln.data.decompose_loader import check_layout, uses_sp
from kiln.data.loader import ChunkLoader, build_loader


def tokens_per_step(recipe, world: int) -> int:
    """decompose: train.tokens_per_step, or micro_batch rows of the longest bucket per data-parallel rank."""
    t, p = recipe.train, recipe.parallel
    return t.tokens_per_step or t.micro_batch * t.grad_accum * (world // p.sp) * (1 << recipe.data.buckets[1])


def derive_grad_accum(recipe, world: int) -> int | None:
    """train.grad_accum from train.global_batch_tokens / global_batch at `world` ranks (None when
    neither is set); ValueError (one line) when the numbers do not divide."""
    t, d = recipe.train, recipe.data
    if not (t.global_batch_tokens or t.global_batch):
        return None
    if t.global_batch_tokens and t.global_batch:
        raise ValueError("set one of train.global_batch_tokens and train.global_batch (tokens or sequences), "
                         "not both")
    if d.packing == "decompose":
        raise ValueError("train.global_batch_tokens / global_batch apply to concat packing; with data.packing="
                         "decompose set train.tokens_per_step (it does not depend on the rank count either)")
    knob = "global_batch_tokens" if t.global_batch_tokens else "global_batch"
    if t.global_batch_tokens % d.seq_len:
        raise ValueError(f"train.global_batch_tokens={t.global_batch_tokens} is not a whole number of "
                         f"data.seq_len={d.seq_len} sequences: use a multiple of {d.seq_len}")
    seqs = t.global_batch or t.global_batch_tokens // d.seq_len
    dp = world // recipe.parallel.sp
    per = t.micro_batch * dp
    if seqs % per:
        lo, hi = max(per, seqs // per * per), (seqs // per + 1) * per
        unit = d.seq_len if t.global_batch_tokens else 1
        raise ValueError(f"train.{knob}={getattr(t, knob)} ({seqs} sequences) does not split into micro-steps of "
                         f"train.micro_batch={t.micro_batch} x {dp} data-parallel ranks = {per} sequences: use "
                         f"{lo * unit} or {hi * unit}, or change train.micro_batch")
    if t.grad_accum not in (1, seqs // per):  # 1: unset; the derived value: a rank that applied it
        raise ValueError(f"train.grad_accum={t.grad_accum} is derived from train.{knob}: remove train.grad_accum")
    return seqs // per


def check_recipe(recipe, world: int | None = None) -> None:
    """ValueError (one line) for a recipe whose batch settings cannot run at `world` ranks (default:
    train.nproc on each of slurm.nodes nodes)."""
    t, p, d = recipe.train, recipe.parallel, recipe.data
    world = world or t.nproc * recipe.slurm.nodes
    derive_grad_accum(recipe, world)
    if d.packing != "decompose":
        if p.sp_min_len:
            raise ValueError("parallel.sp_min_len applies to data.packing=decompose: remove it or "
                             "set data.packing=decompose")
        if t.tokens_per_step:
            raise ValueError("train.tokens_per_step applies to data.packing=decompose; concat steps "
                             "hold micro_batch x grad_accum x ranks x data.seq_len tokens: remove it")
        return
    check_layout(tokens_per_step(recipe, world), d.buckets, world, p.sp, p.sp_min_len, t.grad_accum)


def _decomposed(recipe, data):
    from kiln.data.decompose import Decomposed, bucket_dir

    d = recipe.data
    return Decomposed.load(bucket_dir(data.dir, d.buckets, d.decompose_seed, d.long_doc_rule), checksum=False)


def train_batches(recipe, data, mesh):
    """The training BatchSource of this rank: concat-and-chunk, decomposition buckets, or the
    prompt/response rows of data.sft_file (objective.meap.sft)."""
    d, t = recipe.data, recipe.train
    if recipe.objective.name == "meap" and recipe.objective.meap.sft:
        from kiln.data.sft import SftBatches, encode_sft, read_sft_jsonl

        rows = encode_sft(read_sft_jsonl(d.sft_file), data.tokenizer(), d.seq_len, data.eot_id, data.pad_id)
        return SftBatches(rows, t.micro_batch, mesh.dp_rank, mesh.dp, t.seed, t.grad_accum)
    if d.packing == "decompose":
        from kiln.data.decompose_loader import build_decompose_loader

        check_recipe(recipe, mesh.world)
        return build_decompose_loader(d, _decomposed(recipe, data), "train", tokens_per_step(recipe, mesh.world),
                                      mesh.rank, mesh.world, sp=mesh.sp, sp_min_len=recipe.parallel.sp_min_len,
                                      seed=t.seed, grad_accum=t.grad_accum, horizon=t.steps)
    return build_loader(d, data.train_prefix, micro_batch=t.micro_batch, dp_rank=mesh.dp_rank,
                        dp_size=mesh.dp, seed=t.seed, grad_accum=t.grad_accum)


def held_out_batches(recipe, data, mesh):
    """The held-out batches: fixed windows of data.seq_len, each data-parallel rank its own; with
    data.packing=decompose every bucket of the valid split instead (DecomposeHeldOut: tagged by
    bucket and weighted by its held-out tokens, so eval/loss is their token-weighted mean and the
    decompose hook logs eval/loss_b{k})."""
    t = recipe.train
    if recipe.data.packing == "decompose":
        from kiln.data.decompose_loader import build_decompose_heldout

        return build_decompose_heldout(_decomposed(recipe, data), tokens_per_step(recipe, mesh.world), mesh.rank,
                                       mesh.world, sp=mesh.sp, sp_min_len=recipe.parallel.sp_min_len,
                                       grad_accum=t.grad_accum)
    return ChunkLoader(data.valid_prefix, recipe.data.seq_len, t.micro_batch, mesh.dp_rank, mesh.dp, t.seed)


def ring_for(recipe):
    """decompose with sp > 1: which row lengths run sequence-parallel (None: every batch does)."""
    p = recipe.parallel
    if recipe.data.packing != "decompose":
        return None
    return lambda row_len: uses_sp(row_len, p.sp, p.sp_min_len)
