// The ESM entry point: the very objects of index.cjs (one implementation, so no dual-package hazard).
import flowpool from './index.cjs';

export default flowpool.Flowpool;
export const {
  Flowpool, Maitai, Stream, DEFAULT_BASE_URL, VERSION, FlowpoolError, APIError, BadRequestError,
  AuthenticationError, NotFoundError, WorkflowTimeoutError, PayloadTooLargeError, UnprocessableEntityError,
  RateLimitError, InternalServerError, ServiceUnavailableError, APIConnectionError, APITimeoutError,
  APIUserAbortError,
} = flowpool;
