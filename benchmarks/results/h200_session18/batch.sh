# Session 18's batch on nvidia-h200-x2 (two H200s). Sourced after benchmarks/h200_env.sh and
# benchmarks/h200_batch.sh. GPU 0 samples 512 synthetic windows, GPU 1 samples 256 (two cache keys);
# a background launcher starts two more runs once the 512-window file is in the cache.
sp a24_l512_w512 0 2 2:4 surgeon:l512:b4:lb8:r32:lr3e-3:distill:ad32:syn512:synb256
sp a24_l512_w256 1 2 2:4 surgeon:l512:b4:lb8:r32:lr3e-3:distill:ad32:syn256:synb256
setsid nohup bash -c '
  source benchmarks/h200_env.sh; source benchmarks/h200_batch.sh
  for i in $(seq 1 200); do ls $CACHE/synthetic_512_*.pt >/dev/null 2>&1 && break; sleep 5; done
  date; ls -la $CACHE
  sp a24_l256_w512 0 2 2:4 surgeon:l256:b4:lb8:r32:lr3e-3:distill:ad32:syn512:synb256
  sp a24_l384_w512_lr2e-3 1 2 2:4 surgeon:l384:b4:lb8:r32:lr2e-3:distill:ad32:syn512:synb256
' > /root/res/launcher.log 2>&1 < /dev/null &
