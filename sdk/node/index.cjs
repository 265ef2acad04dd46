'use strict';
/**
 * flowpool's client for Node: `new Flowpool({apiKey, baseURL})`, then
 * `await client.workflow.completions.create({model: 'workflow:<name>', input})`.
 *
 * The implementation is CommonJS; index.mjs re-exports these same objects for `import`, so a program that
 * loads the package both ways still has one Flowpool class and one set of error classes.
 */
const errors = require('./lib/errors.cjs');
const { Flowpool, Maitai, Stream, DEFAULT_BASE_URL, VERSION } = require('./lib/client.cjs');

module.exports = Flowpool;
module.exports.default = Flowpool;
module.exports.Flowpool = Flowpool;
module.exports.Maitai = Maitai;
module.exports.Stream = Stream;
module.exports.DEFAULT_BASE_URL = DEFAULT_BASE_URL;
module.exports.VERSION = VERSION;
module.exports.FlowpoolError = errors.FlowpoolError;
module.exports.APIError = errors.APIError;
module.exports.BadRequestError = errors.BadRequestError;
module.exports.AuthenticationError = errors.AuthenticationError;
module.exports.NotFoundError = errors.NotFoundError;
module.exports.WorkflowTimeoutError = errors.WorkflowTimeoutError;
module.exports.PayloadTooLargeError = errors.PayloadTooLargeError;
module.exports.UnprocessableEntityError = errors.UnprocessableEntityError;
module.exports.RateLimitError = errors.RateLimitError;
module.exports.InternalServerError = errors.InternalServerError;
module.exports.ServiceUnavailableError = errors.ServiceUnavailableError;
module.exports.APIConnectionError = errors.APIConnectionError;
module.exports.APITimeoutError = errors.APITimeoutError;
module.exports.APIUserAbortError = errors.APIUserAbortError;
