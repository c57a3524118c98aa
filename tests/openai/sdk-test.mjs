// The official `openai` npm package against polydev's /v1 (crates/polydev/tests/it/openai.rs
// runs it). Usage: node sdk-test.mjs BASE_URL TOKEN. Prints one JSON object with what it saw;
// any failed check exits non-zero.
import assert from 'node:assert/strict';
import OpenAI, { RateLimitError } from 'openai';
import { VERSION } from 'openai/version';

const [base, token] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: token, maxRetries: 0 });
const seen = { sdk: `openai-node ${VERSION}` };

const models = [];
for await (const model of client.models.list()) models.push(model.id);
assert.ok(models.includes('gemini-eco'), String(models));

// Not streaming, from a Gemini-format model, with an Idempotency-Key: the retry is the same
// answer, charged once.
const ask = {
  model: 'gemini-eco',
  messages: [{ role: 'developer', content: 'Be brief.' }, { role: 'user', content: 'Hello from node' }],
};
const first = await client.chat.completions.create(ask, { headers: { 'Idempotency-Key': 'node-retry-1' } });
const again = await client.chat.completions.create(ask, { headers: { 'Idempotency-Key': 'node-retry-1' } });
assert.match(first.choices[0].message.content, /Hello from node/);
assert.equal(again.choices[0].message.content, first.choices[0].message.content);
assert.equal(again.id, first.id, 'the replay is the same completion');
assert.equal(again.polydev.replayed, true);
seen.idempotent = { id: first.id, request_id: first.polydev.request_id };

// Streaming with the usage chunk.
const stream = await client.chat.completions.create({
  model: 'gpt-premium',
  messages: [{ role: 'user', content: [{ type: 'text', text: 'Stream to node please' }] }],
  stream: true,
  stream_options: { include_usage: true },
});
let text = '';
let chunks = 0;
let usage = null;
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) {
    if (choice.delta.content) {
      text += choice.delta.content;
      chunks += 1;
    }
  }
}
assert.match(text, /Stream to node please/);
assert.ok(chunks > 1, `${chunks} chunks`);
assert.ok(usage && usage.completion_tokens > 0);
seen.stream = { text, chunks, usage };

// Tools, streamed, with the SDK's runner helper assembling the call.
const tools = [{
  type: 'function',
  function: { name: 'lookup_weather', parameters: { type: 'object', properties: { query: { type: 'string' } } } },
}];
const runner = client.chat.completions.stream({
  model: 'gpt-premium',
  messages: [{ role: 'user', content: 'Weather in Oslo?' }],
  tools,
});
const final = await runner.finalChatCompletion();
const call = final.choices[0].message.tool_calls[0];
assert.equal(call.function.name, 'lookup_weather');
assert.deepEqual(JSON.parse(call.function.arguments), { query: 'Weather in Oslo?' });
assert.equal(final.choices[0].finish_reason, 'tool_calls');
seen.tools = call.function.arguments;

// A refusal for the quota: 429 in OpenAI's shape, naming the limit and when it resets.
try {
  await client.chat.completions.create({ model: 'claude-normal', messages: [{ role: 'user', content: 'over quota?' }] });
  assert.fail('the call over the quota succeeded');
} catch (e) {
  assert.ok(e instanceof RateLimitError, String(e));
  assert.equal(e.code, 'insufficient_quota');
  seen.quota_error = e.error;
}

console.log(JSON.stringify(seen));
