"""A torchrun worker for tests/test_sharded_scoring.py (not a test): runs the scoring jobs of a
JSON file in one process group, so two processes score several configurations for one start.

    torchrun --standalone --nproc_per_node=2 tests/sharded_worker.py JOBS.json

Each job: ``{"category", "config": ScoreConfig fields, "run": ScoringRun fields}``; with
``"die_rank": R`` rank R kills itself (SIGKILL) just before handing its scores to rank 0.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scoring.pipeline.evaluation as evaluation  # noqa: E402
from common.distributed import cleanup, init_distributed, stop_on_sigterm  # noqa: E402
from common.errors import UserError  # noqa: E402
from scoring import ScoreConfig, ScoringRun, score_categories  # noqa: E402


def die_before_gathering(part, shards):
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    shards = init_distributed("cpu")
    stop_on_sigterm(shards)
    try:
        for job in jobs:
            if job.get("die_rank") == shards.rank:
                evaluation.gather_to_main = die_before_gathering
            config = ScoreConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()})
            score_categories(config, ScoringRun(**job["run"]), [job["category"]], "cpu", echo=False,
                             shards=shards)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup(shards)


if __name__ == "__main__":
    main()
