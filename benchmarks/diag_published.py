"""CPU diagnostic of ``method="published"`` on SmolLM2-135M: with and without its OBS updates.

One shot to 10% of the decoder linear weights, 8 x 128 calibration tokens and 2 x 512 evaluation
tokens from the saved windows (``bench_quality.py --save-tokens .stage``). Prints PPL and how many
rows / columns of each kind of matrix were masked. Run: ``python benchmarks/diag_published.py``.
"""

from __future__ import annotations

import collections
from unittest import mock

import torch

import surgeon_fx as sf
from surgeon_fx import kfac
from surgeon_fx.evaluate import perplexity
from surgeon_fx.models import load_smollm2


def run(model, calib, ev, tag: str) -> None:
    out = sf.compress(model, 0.1, calibration=calib, method="published", shots=1, progress=False)
    res = out.surgeon_fx_masks
    count = collections.Counter()
    for side, masked in (("rows", res.rows), ("cols", res.cols)):
        for fqn, idx in masked.items():
            count[f"{fqn.split('.')[-2]}:{side}"] += len(idx)
    print(f"{tag}: ppl {perplexity(out, ev, progress=False):.2f}, masked {dict(sorted(count.items()))}", flush=True)


def main() -> None:
    model, _ = load_smollm2()
    calib = torch.load(".stage/calib.pt")[:8, :128]
    ev = torch.load(".stage/eval.pt")[:2, :512]
    print(f"dense: ppl {perplexity(model, ev, progress=False):.2f}", flush=True)
    run(model, calib, ev, "published")

    def zero(w, *_):
        return torch.zeros_like(w, dtype=torch.float64)

    with mock.patch.object(kfac, "row_update", zero), mock.patch.object(kfac, "col_update", zero):
        run(model, calib, ev, "published without its OBS updates")


if __name__ == "__main__":
    main()
