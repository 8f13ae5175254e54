"""The leaderboard, generated from the tracking store and never edited by hand.

One table per (experiment, dataset): each method's best configuration, every leaderboard metric as mean ± 95% CI over
seeds (Student t), the rank metric's paired per-seed difference from a baseline method (Holm-adjusted over the column,
with an exact sign-flip p), which methods a test cannot tell from the best one and which an equivalence test (TOST)
shows within a margin of it, and where each number came from (runs, git sha, recipe hash, parameters). With several
task instances: one table per instance and a pooled one whose unit is the instance. Where the runs logged a selection
metric (on evaluation prompts set aside for it) the best configuration is picked on that, never on the reported
numbers; otherwise it is picked on the reported metric and the caption says it is optimistic. A pick at the edge of
its grid is flagged. docs/statistics.md says which test backs which mark.

``table`` builds the tables, ``store`` reads them from MLflow, ``render`` writes them out, ``plots`` draws them.
"""

from expo_bench.leaderboard.render import lc_warning, write_leaderboard
from expo_bench.leaderboard.store import load_leaderboard
from expo_bench.leaderboard.table import (
    Configuration,
    LeaderboardTable,
    NothingToRank,
    StoredRun,
    build_table,
    experiment_tables,
)

__all__ = [
    "Configuration",
    "LeaderboardTable",
    "NothingToRank",
    "StoredRun",
    "build_table",
    "experiment_tables",
    "lc_warning",
    "load_leaderboard",
    "write_leaderboard",
]
