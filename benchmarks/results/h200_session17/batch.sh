# Session 17's batch on one H200 (nvidia-h200; the x2 kind was not lent). Sourced after
# benchmarks/h200_env.sh and benchmarks/h200_batch.sh: the first run samples the 256 synthetic windows
# into the cache, the others start once the file is there and read it (same teacher and sampling key).
sp a24 0 2 2:4 surgeon:l128:b4:lb8:r32:lr3e-3:distill:ad32:syn256:synb256
for i in $(seq 1 100); do ls $CACHE/synthetic_256_*.pt >/dev/null 2>&1 && break; sleep 5; done; ls -la $CACHE; date
sp a24full 0 2 2:4 surgeon:l128:b4:lb8:rfull:lr1e-4:distill:ad32:syn256:synb256
sp ufull 0 4 unstructured surgeon:band0.1:l64:b4:lb8:rfull:lr1e-4:distill:ad32:syn256:synb256
sp ul96 0 4 unstructured surgeon:band0.1:l96:b4:lb8:r32:lr3e-4:distill:ad32:syn256:synb256
