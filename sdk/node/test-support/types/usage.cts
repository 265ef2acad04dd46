// The package as CommonJS code uses it (`require('flowpool')` is the Flowpool class, the other names its
// properties), compiled by test/types.test.mjs.
import Flowpool = require('flowpool');
import { Maitai, NotFoundError } from 'flowpool';

const client = new Flowpool({ apiKey: 'fp_x' });
const named: Flowpool = new Flowpool.Flowpool();
const fromDefault: Flowpool = new Flowpool.default();
const maitai: Flowpool.Maitai = new Maitai({ apiKey: 'fp_x' });
const options: Flowpool.ClientOptions = { timeout: 1000 };

async function main(): Promise<void> {
  try {
    await client.workflows.delete('wf');
  } catch (err) {
    if (err instanceof NotFoundError || err instanceof Flowpool.APIConnectionError) console.log(err.status);
  }
  const done: Flowpool.ChatCompletion = await maitai.workflow.completions.create({ model: 'workflow:echo' });
  console.log(done.output, named, fromDefault, options);
}
void main;
// @ts-expect-error not a name of the package
console.log(Flowpool.Completions);
