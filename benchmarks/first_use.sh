#!/bin/bash
# Issue 22 targets (docs/benchmarks.md, "Launch to exit"): cold and warm start of `pagedlm generate` and LLM(), fresh HOME and caches.
cd "$(dirname "$0")/.."; export PATH=$PWD/.venv/bin:$PATH
H=$(mktemp -d); export HOME=$H TORCHINDUCTOR_CACHE_DIR=$H/ind XDG_CACHE_HOME=
unset XDG_CACHE_HOME PAGEDLM_CACHE_DIR
echo "HOME=$H"; uptime
gen() { /usr/bin/time -f "$1: %e s launch to exit" python -m pagedlm.cli generate "The capital of France is" --max-tokens 32 2>&1 | grep -E "launch to exit|TTFT|compiled decode" ; }
gen "1st process (empty HOME)"
gen "2nd process (at once)"
echo "waiting for the background builds..."; t0=$(date +%s)
while pgrep -f "pagedlm.engine.aot|pagedlm.kernels" >/dev/null; do sleep 2; done
echo "background work done $(( $(date +%s) - t0 )) s after the 2nd process exited"; uptime
gen "3rd process (background done)"
gen "4th process"
python - <<'PY'
import time, sys
t0 = time.perf_counter()
from pagedlm import LLM, SamplingParams
t1 = time.perf_counter()
llm = LLM()
t2 = time.perf_counter()
out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)
t3 = time.perf_counter()
print(f"warm: import {t1-t0:.2f} s, LLM() {t2-t1:.2f} s, generate 32 tokens {t3-t2:.2f} s; buckets {llm.engine.runner.compiled.states()}")
PY
ls -la $H/.cache/pagedlm/*/ | grep -v lock
