"""The published prompt lists in the shared data folder next to the repository, and the skip for when they are absent."""

from pathlib import Path

import pytest

DATA = Path(__file__).parents[3] / "shared" / "data"
NEMO_MEM = DATA / "nemo_memorized_laion_prompts.csv"
NEMO_UNMEM = DATA / "nemo_unmemorized_laion_prompts.csv"
WEN = DATA / "wen_sdv1_500_memorized.jsonl"

needs_data = pytest.mark.skipif(
    not (NEMO_MEM.exists() and NEMO_UNMEM.exists() and WEN.exists()),
    reason=f"published prompt lists not found in {DATA} (the shared data folder next to the repository)",
)
