"""The recipe's `objective:` section. Each objective owns its subsection here as it gains knobs."""
from dataclasses import dataclass, field


@dataclass
class MeapConfig:
    """MEAP: next-token prediction on inputs partly replaced by the MASK token."""

    mask_ratio: float = field(default=0.15, metadata={
        "help": "fraction of input positions replaced by MASK each step (labels unchanged)", "gt": 0, "lt": 1})
    same_positions_per_batch: bool = field(default=False, metadata={
        "help": "true = one set of positions per step for every row (the authors' code); "
                "false = fresh positions per row"})
    sft: bool = field(default=False, metadata={
        "help": "MEAP's SFT variant: train on data.sft_file's prompt/response pairs, labels on the response only, "
                "each example also as a copy with sft_mask_ratio of its response inputs masked"})
    sft_mask_ratio: float = field(default=0.1, metadata={
        "help": "objective.meap.sft: fraction of response input positions masked in the copy", "gt": 0, "lt": 1})


@dataclass
class MlmConfig:
    """BERT-style masked language modelling on the bidirectional encoder (model.causal=false)."""

    mask_ratio: float = field(default=0.15, metadata={
        "help": "fraction of positions selected for prediction each step", "gt": 0, "lt": 1})
    mask_fraction: float = field(default=0.8, metadata={
        "help": "of the selected positions, the share replaced by MASK (BERT: 0.8)", "min": 0, "max": 1})
    random_fraction: float = field(default=0.1, metadata={
        "help": "of the selected positions, the share replaced by a random token (BERT: 0.1); "
                "the rest keep their token", "min": 0, "max": 1})

    def validate(self):
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError(f"objective.mlm.mask_fraction + objective.mlm.random_fraction = "
                             f"{self.mask_fraction + self.random_fraction:g} must be <= 1 (the rest keep their token)")


@dataclass
class ElectraConfig:
    """ELECTRA: a small MLM generator and the discriminator (the recipe's model) that detects its replacements."""

    mask_ratio: float = field(default=0.15, metadata={
        "help": "fraction of positions replaced by MASK for the generator each step", "gt": 0, "lt": 1})
    generator_width: float = field(default=0.25, metadata={
        "help": "generator hidden size as a fraction of model.dim (rounded to whole heads of the "
                "discriminator's head size; its layer count is the discriminator's)", "gt": 0, "max": 1})
    disc_weight: float = field(default=50.0, metadata={
        "help": "lambda: loss = generator MLM + disc_weight * replaced-token-detection", "gt": 0})


@dataclass
class ObjectiveConfig:
    """What the loss is."""

    name: str = field(default="clm", metadata={
        "help": "training objective: clm = next-token prediction, meap = next-token prediction on "
                "inputs with objective.meap.mask_ratio of the positions masked, mlm = BERT-style masked "
                "language modelling, electra = replaced-token detection with an MLM generator (mlm and "
                "electra need model.causal=false)", "choices": ["clm", "meap", "mlm", "electra"]})
    z_loss: float = field(default=0.0, metadata={
        "help": "coefficient of the output z-loss (lse^2), 0 = off", "min": 0})
    meap: MeapConfig = field(default_factory=MeapConfig, metadata={"help": "MEAP's knobs (objective.name=meap)"})
    mlm: MlmConfig = field(default_factory=MlmConfig, metadata={"help": "MLM's knobs (objective.name=mlm)"})
    electra: ElectraConfig = field(default_factory=ElectraConfig, metadata={
        "help": "ELECTRA's knobs (objective.name=electra)"})
