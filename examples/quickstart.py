"""Compress the packaged SmolLM2-135M by 30% and compare perplexity (CPU, about a minute).

Run: ``python examples/quickstart.py [path/to/wikitext-2-raw/test.jsonl]``.
"""

from __future__ import annotations

import sys

import surgeon_fx as sf
from surgeon_fx.data import eval_windows, wiki_calibration_text, wikitext2_text
from surgeon_fx.evaluate import count_parameters, perplexity
from surgeon_fx.models import load_smollm2


def main() -> None:
    model, tok = load_smollm2()
    text = wikitext2_text(sys.argv[1]) if len(sys.argv) > 1 else wiki_calibration_text()
    windows = eval_windows(tok, text, seq_len=256, max_windows=4)
    small = sf.compress(model, 0.3, method="magnitude")
    print(small.surgeon_fx_plan.summary())
    for name, m in [("dense", model), ("compressed", small)]:
        print(f"{name:>10}: {count_parameters(m):,} parameters, perplexity {perplexity(m, windows):.2f}")


if __name__ == "__main__":
    main()
