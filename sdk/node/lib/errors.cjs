'use strict';
/**
 * The errors of the client, one class per status, named as the Python SDK's (flowpool/client.py):
 *
 *   FlowpoolError                   any error of this package
 *   └── APIError                    an error status (and a stream's error event)
 *       ├── BadRequestError           400
 *       ├── AuthenticationError       401
 *       ├── NotFoundError             404
 *       ├── WorkflowTimeoutError      408 (the run passed its time limit)
 *       ├── PayloadTooLargeError      413
 *       ├── UnprocessableEntityError  422 (an Idempotency-Key sent with another request)
 *       ├── RateLimitError            429
 *       ├── InternalServerError       500 (the script raised, or the run failed)
 *       ├── ServiceUnavailableError   503
 *       ├── APIConnectionError        no answer: refused, reset, dropped (status undefined)
 *       │   └── APITimeoutError       no answer within the call's timeout
 *       └── APIUserAbortError         the caller's AbortSignal fired
 */

// What an error shows of a body that is not the API's JSON (a proxy's HTML page, say).
const TEXT_SHOWN = 500;

class FlowpoolError extends Error {}

class APIError extends FlowpoolError {
  /**
   * @param {number|undefined} status the HTTP status; undefined when no answer came
   * @param {unknown} body the answer's body as it came: the API's {"error": {...}} JSON, or text
   * @param {Headers|undefined} headers the answer's headers
   * @param {string} [message] the message when the body has none
   */
  constructor(status, body, headers, message) {
    const error = body && typeof body === 'object' && body.error && typeof body.error === 'object' ? body.error : {};
    let text = error.message ?? message;
    if (text == null && body != null && body !== '') text = typeof body === 'string' ? body : JSON.stringify(body);
    text = text == null ? undefined : String(text).slice(0, TEXT_SHOWN);
    const type = typeof error.type === 'string' ? error.type : undefined;
    // A run's error names it in the body; an answer that carries a run's id names it in the header.
    const requestId = error.request_id ?? (headers ? headers.get('x-request-id') : null) ?? undefined;
    let described = status === undefined ? (text ?? 'error') : `${status} ${type ?? 'error'}: ${text ?? ''}`.trimEnd();
    if (requestId) described += ` (request_id ${requestId})`;
    super(described);
    this.status = status;
    this.type = type;
    this.code = error.code;
    this.param = error.param;
    this.error = body && typeof body === 'object' ? body.error : undefined;
    this.body = body;
    this.headers = headers;
    this.requestId = requestId;
  }
}

class BadRequestError extends APIError {}
class AuthenticationError extends APIError {}
class NotFoundError extends APIError {}
class WorkflowTimeoutError extends APIError {}
class PayloadTooLargeError extends APIError {}
class UnprocessableEntityError extends APIError {}
class RateLimitError extends APIError {}
class InternalServerError extends APIError {}
class ServiceUnavailableError extends APIError {}

class APIConnectionError extends APIError {
  /** @param {{message?: string, cause?: unknown}} [options] */
  constructor({ message, cause } = {}) {
    super(undefined, undefined, undefined, message ?? 'Connection error.');
    if (cause !== undefined) this.cause = cause;
  }
}

class APITimeoutError extends APIConnectionError {
  constructor({ message, cause } = {}) {
    super({ message: message ?? 'Request timed out.', cause });
  }
}

class APIUserAbortError extends APIError {
  constructor({ message, cause } = {}) {
    super(undefined, undefined, undefined, message ?? 'Request was aborted.');
    if (cause !== undefined) this.cause = cause;
  }
}

const ERRORS = {
  400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 408: WorkflowTimeoutError,
  413: PayloadTooLargeError, 422: UnprocessableEntityError, 429: RateLimitError, 500: InternalServerError,
  503: ServiceUnavailableError,
};

const CLASSES = {
  FlowpoolError, APIError, BadRequestError, AuthenticationError, NotFoundError, WorkflowTimeoutError,
  PayloadTooLargeError, UnprocessableEntityError, RateLimitError, InternalServerError, ServiceUnavailableError,
  APIConnectionError, APITimeoutError, APIUserAbortError,
};
// Each class prints as its own name (minifiers and subclassing keep it right).
for (const [name, cls] of Object.entries(CLASSES)) {
  Object.defineProperty(cls.prototype, 'name', { value: name, writable: true, configurable: true });
}

/** The error of a status: its own class, or APIError for one without. */
function errorFor(status, body, headers) {
  const Cls = ERRORS[status] ?? APIError;
  return new Cls(status, body, headers);
}

module.exports = { ...CLASSES, errorFor };
