// The package as an ES module uses it, compiled by test/types.test.mjs: what compiles here is what the types
// promise, and each @ts-expect-error is a mistake they must catch.
import Flowpool, {
  APIError, Maitai, RateLimitError, type ChatCompletion, type StreamEvent, type WorkflowChunk,
} from 'flowpool';

const client = new Flowpool({ apiKey: 'fp_x', baseURL: 'http://127.0.0.1:8080', maxRetries: 1 });
const maitai: Flowpool = new Maitai();
const same: typeof Flowpool = Flowpool.default;

const done: ChatCompletion = await client.workflow.completions.create({ model: 'workflow:echo', input: {} });
console.log(done.choices[0].message.content, done.output, done.request_id);

const stream = await maitai.workflow.completions.create({ model: 'workflow:echo', stream: true });
for await (const event of stream) {
  if (event.object === 'workflow.chunk') console.log(event.type, event.content);
  else console.log(event.choices[0].message.content);
}
for await (const event of client.workflow.completions.create({ model: 'workflow:echo', stream: true },
  { signal: AbortSignal.timeout(5), idempotencyKey: 'k-1' })) {
  const chunk: StreamEvent = event;
  if (!event.choices) console.log((chunk as WorkflowChunk).index);
}

try {
  await client.workflows.upload({ workflow_ref_name: 'wf', script: 'x', accessories: { words: '{}' } });
} catch (err) {
  if (err instanceof RateLimitError) console.log(err.headers?.get('retry-after'));
  if (err instanceof APIError) console.log(err.status, err.type, err.requestId);
}
const run = await client.workflow.runs.create({ model: 'workflow:echo' }, { idempotencyKey: 'k-2' });
console.log((await client.runs.get(run.request_id, { wait: 5 })).status);
const page = await client.workflows.list({ limit: 10 });
console.log(page.data.length, page.pagination.total, client.withOptions({ timeout: 5 }).timeout, same);

// @ts-expect-error a stream is no completion
const wrong: ChatCompletion = await client.workflow.completions.create({ model: 'workflow:echo', stream: true });
// @ts-expect-error the model is required
await client.workflow.completions.create({ input: {} });
// @ts-expect-error no such option
new Flowpool({ baseUrl: 'http://127.0.0.1:8080' });
console.log(wrong);
