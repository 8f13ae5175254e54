"""The EXPO paper's synthetic tests: a tabular policy over a few responses per prompt."""
