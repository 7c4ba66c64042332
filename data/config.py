"""The recipe's `data:` section."""

from dataclasses import dataclass, field

PACKINGS = ["concat"]  # "decompose" (dataset decomposition buckets) plugs in here later


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenised, and how it is cut into samples."""

    source: str = field(default="stdlib", metadata={
        "help": "'stdlib' (embedded corpus: this Python's standard library), a local path/glob/"
                "comma list of .txt/.jsonl/.parquet files or folders, or 'hf:<name>[:<config>]'"})
    text_field: str = field(default="text", metadata={
        "help": "column holding the document text in .jsonl/.parquet/hub sources"})
    tokenizer: str = field(default="", metadata={
        "help": "path to a tokenizer.json; empty = train a byte-level BPE on the training split"})
    vocab_size: int = field(default=4096, metadata={
        "help": "vocabulary size of the trained BPE (ignored when data.tokenizer is set)"})
    seq_len: int = field(default=256, metadata={
        "help": "tokens per training sample"})
    heldout_percent: float = field(default=2.0, metadata={
        "help": "percent of documents (by a stable hash of path/index) held out for evaluation"})
    max_documents: int = field(default=0, metadata={
        "help": "use only the first N documents of the source (0 = all)"})
    cache_dir: str = field(default=".kiln-cache", metadata={
        "help": "where tokenizers and tokenised data are cached (keyed by content hash)"})
    packing: str = field(default="concat", metadata={
        "help": "how documents become samples: concat = concatenate and chunk, with document masks",
        "choices": PACKINGS})
    num_workers: int = field(default=2, metadata={
        "help": "tokeniser threads for `kiln prepare` (0 = all cores)"})

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value and how to fix it."""
        if not self.source.strip():
            raise ValueError("data.source is empty: set it to 'stdlib', a file path/glob, or 'hf:<name>'")
        if self.source.startswith("hf:") and not self.source[3:].strip(":"):
            raise ValueError("data.source 'hf:' names no dataset: write hf:<name> or hf:<name>:<config>")
        if not self.text_field:
            raise ValueError("data.text_field is empty: set it to the column holding the text, e.g. text")
        if not self.tokenizer and not 260 <= self.vocab_size <= 2**31 - 1:
            raise ValueError(f"data.vocab_size={self.vocab_size} is impossible for a byte-level BPE "
                             "(256 bytes + 3 special tokens): set it to at least 260")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len={self.seq_len} must be at least 1")
        if not 0.0 < self.heldout_percent < 100.0:
            raise ValueError(f"data.heldout_percent={self.heldout_percent} must be in (0, 100): "
                             "kiln always keeps a held-out split for evaluation")
        if self.max_documents < 0:
            raise ValueError(f"data.max_documents={self.max_documents} must be >= 0 (0 = all)")
        if not self.cache_dir:
            raise ValueError("data.cache_dir is empty: set it to a writable folder, e.g. .kiln-cache")
        if self.packing not in PACKINGS:
            raise ValueError(f"data.packing={self.packing!r} is unknown: choose one of {PACKINGS}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0 (0 = all cores)")
