"""Write the quality benchmark's headline scores into the shipped model's card as Hub `model-index` metadata.

    python benchmarks/card_scores.py            # after benchmarks/quality_glosea4.py

Reads `benchmarks/results/quality_glosea4.json` (global region, test month) and updates the front matter of
`model_card.md` and `models/dpdm-glosea4-ts-x4/README.md` (the same card); `tests/test_shipped_model.py` checks that
the card's scores equal the results file's.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpdm_diffusers.model_card import set_model_index

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "quality_glosea4.json"
CARDS = [ROOT / "model_card.md", ROOT / "models" / "dpdm-glosea4-ts-x4" / "README.md"]
MODEL_NAME = "dpdm-glosea4-ts-x4"
DATASET = dict(dataset_name="glosea4-ts-x4 test month 2012-01 (global)", dataset_type="glosea4-ts-x4", dataset_split="test")


def card_scores(results: dict) -> dict[str, float]:
    """Headline scores (K): the largest ensemble with and without conservation, one member, and the baselines."""
    rows = {(r["method"], r["metric"]): r["value"] for r in results["scores"] if r["region"] == "global"}
    n = max(results["config"]["members"])
    picks = [
        (f"DPDM {n}-member mean", "RMSE"), (f"DPDM {n}-member mean", "CRPS"), (f"DPDM {n}-member mean", "SSR"),
        (f"DPDM {n}-member mean + conservation", "RMSE"), (f"DPDM {n}-member mean + conservation", "CRPS"),
        ("DPDM 1 member", "RMSE"), ("Regression UNet", "RMSE"), ("Lerp", "RMSE"), ("Lerp + lapse rate", "RMSE"),
    ]
    return {f"{metric} {method}": rows[(method, metric)] for method, metric in picks if (method, metric) in rows}


def main() -> None:
    scores = card_scores(json.loads(RESULTS.read_text()))
    for card in CARDS:
        card.write_text(set_model_index(card.read_text(), MODEL_NAME, scores, **DATASET))
    print("\n".join(f"{k}: {v:.4f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
