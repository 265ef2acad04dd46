// Types of index.mjs: the objects of index.cjs (typed by index.d.ts, which `import` sees as module.exports, the
// Flowpool class), with Flowpool as the default export and every other name as a named export.
import Flowpool from './index.js';

export default Flowpool;

export {
  Flowpool, Maitai, Stream, DEFAULT_BASE_URL, VERSION, FlowpoolError, APIError, BadRequestError,
  AuthenticationError, NotFoundError, WorkflowTimeoutError, PayloadTooLargeError, UnprocessableEntityError,
  RateLimitError, InternalServerError, ServiceUnavailableError, APIConnectionError, APITimeoutError,
  APIUserAbortError,
} from './index.js';

export type {
  Role, ChatMessage, ClientOptions, RequestOptions, InvokeOptions, CompletionCreateParamsBase,
  CompletionCreateParamsNonStreaming, CompletionCreateParamsStreaming, CompletionCreateParams, Usage,
  ChatCompletionChoice, ChatCompletion, WorkflowChunk, WorkflowLog, StreamEvent, StreamPromise, Run, Page,
  PageParams, UploadParams, Workflow, Completions, Runs, WorkflowRuns, WorkflowResource, Workflows,
} from './index.js';
