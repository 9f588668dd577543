"""`data.sequences`: the settings of sequence data, for the sequence families (`dkf`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SOURCES = ("lgssm", "healing-digits")
"""`data.source` names of generated sequences (`pipelines.sequences`)."""


@dataclass
class SequenceSection:
    column: Optional[str] = None
    """A table's column of sequences: per row a list of steps, each a list of numbers; shorter
    sequences are padded and masked after their last step."""
    steps: int = 10
    """Steps per generated sequence (`lgssm`, `healing-digits`)."""
    samples: int = 2000
    """Sequences of `lgssm` data (`healing-digits` has one per bundled digit, 1797)."""
    state_dim: int = 2
    """Dimension of the `lgssm` source's hidden state (its random parameters follow the seed)."""
    obs_dim: int = 4
    """Dimension of its observations."""

    def problems(self) -> list[str]:
        return [message for bad, message in (
            (self.steps < 1, f"data.sequences.steps must be >= 1, got {self.steps}"),
            (self.samples < 10, f"data.sequences.samples must be >= 10, got {self.samples}"),
            (min(self.state_dim, self.obs_dim) < 1,
             f"data.sequences.state_dim and obs_dim must be >= 1, got {self.state_dim} and {self.obs_dim}"),
            (self.column is not None and not self.column.strip(), "data.sequences.column must not be empty"),
        ) if bad]


def family_problems(family: str, sequences: bool, source: str, section: SequenceSection,
                    sequence_families: list[str], stream: bool) -> list[str]:
    """Sequence families take sequences and only they do: one line for a mismatch."""
    given = source in SOURCES or section.column is not None
    if sequences and not given:
        return [f"model {family} trains on sequences: data.source must be {' or '.join(SOURCES)}, or a "
                f"table with data.sequences.column, got {source!r}"]
    if given and not sequences:
        what = f"data.source {source}" if source in SOURCES else "data.sequences.column"
        return [f"{what} gives sequences, which model {family} cannot train on: use a sequence family "
                f"({', '.join(sequence_families)})"]
    if given and stream:
        return ["data.stream reads a table's rows, not sequences: drop data.stream"]
    return []
