// Types of index.mjs: the names of index.d.ts, and Flowpool as the default export.
import { Flowpool } from './index.js';

export * from './index.js';
export default Flowpool;
