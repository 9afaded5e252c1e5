#!/usr/bin/env bash
# The seed demo against a running gateway (scripts/gateway.sh): routing decisions only,
# no LLM is called and no API key is needed.
set -euo pipefail
URL="${PLANO_URL:-http://127.0.0.1:12000}"

call() {  # call TITLE PATH BODY [extra curl args]
  echo "--- $1 ---"
  curl -sS "$URL$2" -H 'Content-Type: application/json' "${@:4}" -d "$3"
  echo
}

echo "=== Model Routing Service Demo ($URL) ==="
call "1. Code generation query (OpenAI format)" /routing/v1/chat/completions \
  '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write a Python function that implements binary search"}]}'
call "2. Complex reasoning query (OpenAI format)" /routing/v1/chat/completions \
  '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Explain the trade-offs between microservices and monolithic architectures"}]}'
call "3. Simple query - no routing match (OpenAI format)" /routing/v1/chat/completions \
  '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
call "4. Code generation query (Anthropic format)" /routing/v1/messages \
  '{"model": "gpt-4o-mini", "max_tokens": 1024, "messages": [{"role": "user", "content": "Create a REST API endpoint in Rust using actix-web that handles user registration"}]}'
call "5. Code generation query (Responses format)" /routing/v1/responses \
  '{"model": "gpt-4o-mini", "input": "Build a React component that renders a sortable data table"}'
call "6. Inline routing preferences (override the config for this request)" /routing/v1/chat/completions \
  '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write quicksort in Go"}], "routing_preferences": [{"name": "coding", "description": "code generation and debugging", "models": ["openai/gpt-4o"]}, {"name": "general", "description": "simple questions and conversation", "models": ["openai/gpt-4o-mini"]}]}'
call "7. Session pinning - first call (fresh routing decision)" /routing/v1/chat/completions \
  '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write a Python function that implements binary search"}]}' \
  -H 'X-Model-Affinity: demo-session-001'
call "8. Session pinning - second call (same session, pinned)" /routing/v1/chat/completions \
  '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Now explain the trade-offs of merge sort in detail"}]}' \
  -H 'X-Model-Affinity: demo-session-001'
call "9. Different session gets its own fresh routing" /routing/v1/chat/completions \
  '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Explain the trade-offs between microservices and monolithic architectures"}]}' \
  -H 'X-Model-Affinity: demo-session-002'
echo "=== Demo Complete ==="
