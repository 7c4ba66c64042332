"""The recipe's `data:` section.

Plain ranges are field metadata (min/gt/max/lt, "zero" = what 0 means) that the recipe loader
enforces before validate(); validate() keeps the checks of text, of lists and across fields.
"""

from dataclasses import dataclass, field

PACKINGS = ["concat", "decompose"]  # decompose: dataset decomposition buckets (data/decompose.py)
TEXT_UNITS = ["document", "paragraph", "line"]  # what one document is in a .txt file
CURRICULA = ["natural", "grow_p2", "grow_linear", "weights"]  # see data/curriculum.py
LONG_DOC_RULES = ["equal_tokens", "uniform"]  # see data/decompose.py


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenised, and how it is cut into samples."""

    source: str = field(default="stdlib", metadata={
        "help": "'stdlib' (embedded corpus: this Python's standard library), a local path/glob/"
                "comma list of .txt/.jsonl/.parquet files or folders, or 'hf:<name>[:<config>]'"})
    text_field: str = field(default="text", metadata={
        "help": "column holding the document text in .jsonl/.parquet/hub sources"})
    text_unit: str = field(default="document", metadata={
        "help": ".txt files: one document per file, per paragraph (split at blank lines) or per "
                "line; empty ones are dropped", "choices": TEXT_UNITS})
    tokenizer: str = field(default="", metadata={
        "help": "path to a tokenizer.json; empty = train a byte-level BPE on the training split"})
    vocab_size: int = field(default=4096, metadata={
        "help": "vocabulary size of the trained BPE (ignored when data.tokenizer is set)"})
    seq_len: int = field(default=256, metadata={
        "help": "tokens per training sample", "min": 1})
    sft_file: str = field(default="", metadata={
        "help": "objective.meap.sft: a jsonl of {\"prompt\": ..., \"response\": ...} lines, tokenised with the "
                "corpus's tokenizer into data.seq_len rows (the corpus still gives the held-out loss)"})
    heldout_percent: float = field(default=2.0, metadata={
        "help": "percent of documents (by a stable hash of path/index) held out for evaluation",
        "gt": 0, "lt": 100})
    max_documents: int = field(default=0, metadata={
        "help": "use only the first N documents of the source (0 = all)", "min": 0, "zero": "0 = all"})
    cache_dir: str = field(default=".kiln-cache", metadata={
        "help": "where tokenizers and tokenised data are cached (keyed by content hash)"})
    packing: str = field(default="concat", metadata={
        "help": "how documents become samples: concat = concatenate and chunk, with document masks; "
                "decompose = power-of-two chunks of single documents in buckets (variable length)",
        "choices": PACKINGS})
    buckets: list[int] = field(default_factory=lambda: [8, 13], metadata={
        "help": "decompose: [min_log2, max_log2], chunk lengths 2^min .. 2^max tokens"})
    decompose_seed: int = field(default=0, metadata={
        "help": "decompose: seed of the random chunk sizes of documents longer than 2^(max+1)"})
    long_doc_rule: str = field(default="equal_tokens", metadata={
        "help": "decompose: chunk sizes of documents longer than 2^(max+1): equal_tokens = p(k) "
                "proportional to 2^(max-k), the same tokens in every bucket (the authors' rule); "
                "uniform = k uniform over the buckets (most tokens in the longest)",
        "choices": LONG_DOC_RULES})
    curriculum: str = field(default="grow_p2", metadata={
        "help": "decompose: bucket sampling weights (natural = 1 each, grow_p2 = 2^(n-1)..1, "
                "grow_linear = n..1, weights = data.curriculum_weights), shortest bucket first",
        "choices": CURRICULA})
    curriculum_weights: list[float] = field(default_factory=list, metadata={
        "help": "decompose with curriculum=weights: one positive weight per bucket, shortest first"})
    num_cycles: int = field(default=8, metadata={
        "help": "decompose: curriculum cycles per epoch (each runs its share of every bucket)", "min": 1})
    synthetic_needles: float = field(default=0.0, metadata={
        "help": "share of the training split's text made of synthetic key-value needle documents "
                "(kiln.data.needles: a needle line in a slice of a real document, queried at its end; fixed "
                "seed, so every objective sees the same data), 0 = none", "min": 0, "lt": 1, "zero": "0 = none"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "let Hugging Face `datasets` run a hub dataset's own loading script (code from the "
                "dataset's repository); false = never (kiln passes it explicitly; datasets >= 4 runs no "
                "scripts at all)"})
    num_workers: int = field(default=2, metadata={
        "help": "worker processes tokenising during `kiln prepare` (0 = this process, using the "
                "tokenizers library's own threads)", "min": 0, "zero": "0 = tokenise in this process"})

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value and how to fix it (ranges are metadata)."""
        if not self.source.strip():
            raise ValueError("data.source is empty: set it to 'stdlib', a file path/glob, or 'hf:<name>'")
        if self.source.startswith("hf:") and not self.source[3:].strip(":"):
            raise ValueError("data.source 'hf:' names no dataset: write hf:<name> or hf:<name>:<config>")
        if self.text_unit not in TEXT_UNITS:
            raise ValueError(f"data.text_unit={self.text_unit!r} is unknown: choose one of {TEXT_UNITS}")
        if not self.text_field:
            raise ValueError("data.text_field is empty: set it to the column holding the text, e.g. text")
        if not self.tokenizer and not 260 <= self.vocab_size <= 2**31 - 1:
            raise ValueError(f"data.vocab_size={self.vocab_size} is impossible for a byte-level BPE "
                             "(256 bytes + 3 special tokens): set it to at least 260")
        if not self.cache_dir:
            raise ValueError("data.cache_dir is empty: set it to a writable folder, e.g. .kiln-cache")
        if self.packing not in PACKINGS:
            raise ValueError(f"data.packing={self.packing!r} is unknown: choose one of {PACKINGS}")
        if len(self.buckets) != 2 or not 1 <= self.buckets[0] <= self.buckets[1] <= 30:
            raise ValueError(f"data.buckets={self.buckets} must be [min_log2, max_log2] with "
                             "1 <= min <= max <= 30, e.g. [8, 13] for 256..8192 tokens")
        n = self.buckets[1] - self.buckets[0] + 1
        if self.curriculum == "weights" and (len(self.curriculum_weights) != n or
                                             min(self.curriculum_weights, default=0) <= 0):
            raise ValueError(f"data.curriculum=weights needs data.curriculum_weights with {n} "
                             f"positive numbers (one per bucket 2^{self.buckets[0]}..2^"
                             f"{self.buckets[1]}), got {self.curriculum_weights}")
        if self.long_doc_rule not in LONG_DOC_RULES:
            raise ValueError(f"data.long_doc_rule={self.long_doc_rule!r} is unknown: choose one of {LONG_DOC_RULES}")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"data.curriculum={self.curriculum!r} is unknown: choose one of {CURRICULA}")
