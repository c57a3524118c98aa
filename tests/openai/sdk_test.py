"""The official OpenAI Python SDK against polydev's /v1 (crates/polydev/tests/it/openai.rs runs it).

Usage: python3 sdk_test.py BASE_URL TOKEN. Prints one JSON object with what it saw; the Rust test
checks it against the database. Any assertion failure exits non-zero.
"""

import json
import sys

import openai

base, token = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0)
seen = {"sdk": f"openai-python {openai.__version__}"}

# The catalogue, in OpenAI's list shape.
models = [m.id for m in client.models.list()]
assert "gpt-premium" in models, models
assert client.models.retrieve("claude-normal").owned_by == "anthropic"
seen["models"] = len(models)

# Not streaming.
done = client.chat.completions.create(
    model="gpt-premium",
    messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello from python"},
    ],
)
assert done.object == "chat.completion", done
assert done.choices[0].message.role == "assistant"
assert "Say hello from python" in done.choices[0].message.content, done
assert done.choices[0].finish_reason == "stop"
assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens > 0
seen["plain"] = {"text": done.choices[0].message.content, "usage": done.usage.model_dump(include={"prompt_tokens", "completion_tokens"})}

# Streaming with the usage chunk, from an Anthropic-format model (the format is translated).
stream = client.chat.completions.create(
    model="claude-normal",
    messages=[{"role": "user", "content": "Stream to python please"}],
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
        assert chunk.choices == []
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert len(pieces) > 1, pieces
assert finish == "stop"
assert usage is not None and usage.completion_tokens > 0
seen["stream"] = {"text": "".join(pieces), "chunks": len(pieces), "usage": usage.model_dump(include={"prompt_tokens", "completion_tokens"})}

# Tools: the model calls the function, the caller answers it, the model reads the result.
tools = [{
    "type": "function",
    "function": {
        "name": "lookup_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}]
question = {"role": "user", "content": "Weather in Lyon?"}
first = client.chat.completions.create(model="gpt-premium", messages=[question], tools=tools, tool_choice="auto")
call = first.choices[0].message.tool_calls[0]
assert first.choices[0].finish_reason == "tool_calls", first
assert call.function.name == "lookup_weather"
assert json.loads(call.function.arguments) == {"query": "Weather in Lyon?"}
second = client.chat.completions.create(
    model="gpt-premium",
    messages=[
        question,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ],
    tools=tools,
)
assert "sunny, 21 C" in second.choices[0].message.content, second
seen["tools"] = {"call_id": call.id, "answer": second.choices[0].message.content}

# Tools, streamed: the SDK's helper assembles the call from the chunks.
with client.chat.completions.stream(model="gpt-premium", messages=[question], tools=tools) as events:
    final = events.get_final_completion()
streamed_call = final.choices[0].message.tool_calls[0]
assert streamed_call.function.name == "lookup_weather"
assert json.loads(streamed_call.function.arguments) == {"query": "Weather in Lyon?"}
seen["tools_streamed"] = streamed_call.function.arguments

# Errors, in OpenAI's shape, as the SDK's exception classes.
try:
    client.chat.completions.create(model="no-such-model", messages=[question])
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e.body
try:
    client.chat.completions.create(model="gpt-premium", messages=[question], n=3)
    raise AssertionError("n=3 was accepted")
except openai.BadRequestError as e:
    assert e.param == "n", e.body
try:
    client.chat.completions.create(model="broken-premium", messages=[question])
    raise AssertionError("a failing upstream was a success")
except openai.InternalServerError as e:
    assert e.status_code == 502 and e.code == "upstream_error", e.body
try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="pd_" + "0" * 64, max_retries=0).chat.completions.create(
        model="gpt-premium", messages=[question])
    raise AssertionError("an unknown token was accepted")
except openai.AuthenticationError as e:
    assert e.code == "token_unknown", e.body
    seen["auth_error"] = e.body
seen["errors"] = "ok"

print(json.dumps(seen))
