"""User feedback back into training: read what `tailor serve` stored, turn it into preference pairs, summarize it."""
