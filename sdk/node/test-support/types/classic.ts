// The package from a project compiled as CommonJS with classic resolution (package.json "types": index.d.ts),
// as many older TypeScript projects are, compiled by test/types.test.mjs.
import Flowpool, { APIError, Maitai, type ChatCompletion } from 'flowpool';

export async function invoke(): Promise<ChatCompletion> {
  const client: Flowpool = new Maitai();
  try {
    return await client.workflow.completions.create({ model: 'workflow:echo', input: {} });
  } catch (err) {
    if (err instanceof APIError) console.log(err.status);
    throw err;
  }
}
