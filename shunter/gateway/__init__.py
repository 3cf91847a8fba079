"""Gateway mode: Shunter's global scheduler in front of remote OpenAI servers (vLLM, SGLang)."""
